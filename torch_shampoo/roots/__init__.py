"""Inverse roots off the training thread: the solvers (``matrix_roots``), jobs and tickets
(``jobs``), host staging (``staging``), the CPU thread pool (``pool``), the scheduler that decides
when roots are solved and installed (``scheduler``, ``pending``) and "auto" staleness."""
