"""geofm-pipeline: glue between Snakemake, TerraTorch, DVC and S3."""
