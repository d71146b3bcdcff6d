"""Studies: what turns single runs into answers (the layer between the model and the CLI).

* :mod:`~desim.studies.store` — the result store (SQLite, WAL) every sweep writes and reads;
* :mod:`~desim.studies.cluster` — where tasks run: serial, a local Dask cluster, a scheduler,
  a batch system through dask-jobqueue;
* :mod:`~desim.studies.progress` — progress on stderr (bar or periodic lines);
* :mod:`~desim.studies.grid` — points, the grid runner and per-phase statistics;
* :mod:`~desim.studies.tables` — per-point summaries, paired comparisons, text tables;
* :mod:`~desim.studies.figures` — plot helpers (error bars, CI bands, log axes);
* :mod:`~desim.studies.sweepfile` — sweep files (factors, zip, exclude, where, policies, replications);
* :mod:`~desim.studies.sweeprun` — running a sweep file (fixed or sequential replications);
* :mod:`~desim.studies.results` — a store as a tidy table, per-point CIs and plots;
* :mod:`~desim.studies.capacity` — the largest factor value meeting an SLO, decided from CIs;
* :mod:`~desim.studies.toolkit` — the common options and helpers of the experiment scripts.

The engine these build on is :mod:`desim.sweep` (tasks, keys, ``execute``) and
the statistics are :mod:`desim.stats`. Only the standard library, numpy, pandas
and matplotlib are needed here; Dask only for the cluster backends.
"""
