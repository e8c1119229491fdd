# Datasets: generated sample data, the crop hold-out split, dataset manifests, weights.


rule sample_data:
    """Small synthetic dataset in the real dataset's on-disk format (tasks.<task>.data_root unset)."""
    output:
        directory(f"{EXP['sample_data']['root']}/{{task}}"),
    log:
        f"{LOGS}/sample_data/{{task}}.log",
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        seed=EXP["sample_data"]["seed"],
    script:
        "../scripts/sample_data.py"


rule selection_split:
    """Crop has no test split: hold out training chips to select the checkpoint on."""
    input:
        task_data,
    output:
        train=f"{OUT}/splits/{{task}}/train.txt",
        select=f"{OUT}/splits/{{task}}/select.txt",
        test=f"{OUT}/splits/{{task}}/test.txt",
    log:
        f"{LOGS}/selection_split/{{task}}.log",
    wildcard_constraints:
        task="crop",
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        data_root=lambda w: EXP["tasks"][w.task]["data_root"],
    script:
        "../scripts/selection_split.py"


rule fetch_weights:
    """Download pretrained backbone weights on the login node; compute jobs run offline."""
    output:
        f"{CACHE}/weights/{{model}}/backbone.pt",
    log:
        f"{LOGS}/fetch_weights/{{model}}.log",
    priority: PRIORITY_UNBLOCKS
    retries: 2
    conda:
        "../envs/geofm.yaml"
    params:
        model=lambda w: EXP["models"][w.model],
        cache=f"{CACHE}/huggingface",
    script:
        "../scripts/fetch_weights.py"


rule baseline:
    """Score of a model that ignores its input (majority class / training mean)."""
    input:
        task_data,
        splits=lambda w: f"{OUT}/splits/crop/train.txt" if w.task == "crop" else [],
    output:
        f"{OUT}/baselines/{{task}}.json",
    log:
        f"{LOGS}/baseline/{{task}}.log",
    conda:
        "../envs/geofm.yaml"
    params:
        data_root=lambda w: EXP["tasks"][w.task]["data_root"],
    script:
        "../scripts/baseline.py"
