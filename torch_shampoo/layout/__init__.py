"""Where a parameter's state lives: its blocks (``blocking``), buckets of equal-shape blocks
stacked (``buckets``) and the packed storage of ``compact_state`` (``compact``)."""
