"""The step's math, in the order ``Engine._step_parameters`` calls it: units (``per_unit``: one
parameter, or a bucket of single-block parameters, and each one's elementwise lines), the same
lines batched over units (``foreach``), the statistics and preconditioning of whole buckets
(``bucketed``), pure kernels on stacks of blocks (``kernels``), grafting, SOAP's eigenbasis."""
