"""Users' per-request LoRAs: a reference to a checked file in the cache (references), fetched safely
(remote), loaded as adapters beside the fused acceleration (adapters), or hot-swapped into a compiled
UNet's slots (hotswap)."""
