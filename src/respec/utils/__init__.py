"""The ground floor: atomic files, the cache directory and data paths, the config machinery."""
