"""Rule selection_split: the deterministic crop hold-out (train / select / test id lists)."""

from pathlib import Path

from geofm import errors
from geofm.tasks import crop_selection_split

sm = snakemake  # noqa: F821 (provided by Snakemake)
with errors.captured(sm.log[0]):
    splits = crop_selection_split(Path(sm.params.data_root))
    for name in ("train", "select", "test"):
        Path(sm.output[name]).write_text("".join(f"{chip}\n" for chip in splits[name]))
        print(f"{name}: {len(splits[name])} chips")
