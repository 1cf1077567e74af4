"""Multi-process training: roots shared out among ranks (``partition_roots``), state shared out
among ranks (``partition_state``) and FSDP2's DTensor parameters (``dtensor``)."""
