# Datasets: generated sample data, their validation and manifest, selection hold-outs, trivial
# baselines, weights.


rule sample_data:
    """Small synthetic dataset in the real dataset's on-disk format (tasks.<task>.data_root unset)."""
    output:
        directory(SAMPLE_DIR),
    log:
        L.log("sample_data", "{task}"),
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        seed=EXP["sample_data"]["seed"],
    script:
        "../scripts/sample_data.py"


rule fetch_data:
    """The published dataset (tasks.<task>.download), downloaded on the login node, verified against
    its checksums and unpacked into the task's layout (geofm/download.py)."""
    output:
        directory(f"{CACHE}/datasets/{{task}}"),
    log:
        L.log("fetch_data", "{task}"),
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        downloads=EXP["downloads"],
        cache=f"{CACHE}/downloads",
    script:
        "../scripts/fetch_data.py"


rule validate_data:
    """Every file of a dataset checked against its task's format and hashed, in one read; a bad
    file stops the task's cells before any GPU time, named in one line (geofm/datacheck.py).
    Then the trivial baseline's score (majority class / training mean) on the reported split."""
    input:
        task_data,
        splits=lambda w: holdout_lists(w, "train"),
    output:
        manifest=L.dataset_manifest(),
        baseline=L.baseline(),
    log:
        L.log("validate_data", "{task}"),
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    # One core: with two, on a 2-core machine no check could run beside a fine-tune, and the
    # other tasks' checks waited for it (benchmarks/overhead.py: 1.84x -> see the README).
    threads: 1
    params:
        data_root=lambda w: EXP["tasks"][w.task]["data_root"],
        fingerprint=dataset_fingerprint,
        err=lambda w: [L.err_file(*c) for c in CELLS if c.task == w.task],
        cell="{task} (dataset)",
    script:
        "../scripts/validate_data.py"


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
    """Download pretrained backbone weights on the login node, verified (sha256) and cached by hub id,
    file and revision; compute jobs run offline."""
    output:
        f"{CACHE}/weights/{{weights}}/backbone.pt",
    log:
        L.log("fetch_weights", "{weights}"),
    priority: PRIORITY_UNBLOCKS
    retries: 2
    conda:
        "../envs/geofm.yaml"
    params:
        model=lambda w: next(m for name, m in EXP["models"].items() if weights_key(name) == w.weights),
        downloads=EXP["downloads"],
        cache=f"{CACHE}/weights/hub",
    script:
        "../scripts/fetch_weights.py"
