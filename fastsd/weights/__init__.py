"""The weights: where they live on disk (layout), fetching exactly what a source needs (download, fetch),
checking them (manifest), and the boot check that ties these together (provision)."""
