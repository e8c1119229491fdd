# Datasets: generated sample data, selection hold-outs, trivial baselines, weights.


rule sample_data:
    """Small synthetic dataset in the real dataset's on-disk format (tasks.<task>.data_root unset)."""
    output:
        directory(f"{EXP['sample_data']['root']}/{{task}}"),
    log:
        L.log("sample_data", "{task}"),
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        seed=EXP["sample_data"]["seed"],
    script:
        "../scripts/sample_data.py"


rule selection_split:
    """No usable validation split upstream (Task.holdout): hold out training chips to select on."""
    input:
        task_data,
    output:
        train=f"{L.splits_dir()}/train.txt",
        select=f"{L.splits_dir()}/select.txt",
        test=f"{L.splits_dir()}/test.txt",
    log:
        L.log("selection_split", "{task}"),
    wildcard_constraints:
        task="|".join(HOLDOUT_TASKS) or "(?!)",
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
        L.log("fetch_weights", "{model}"),
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
        splits=lambda w: holdout_lists(w, "train"),
    output:
        L.baseline(),
    log:
        L.log("baseline", "{task}"),
    conda:
        "../envs/geofm.yaml"
    params:
        data_root=lambda w: EXP["tasks"][w.task]["data_root"],
    script:
        "../scripts/baseline.py"
