"""Where a weight lives and how a run is launched on several processes (FSDP2, ZeRO-3, DDP)."""
