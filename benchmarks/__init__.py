"""Ratio benchmarks of dbre against anchors on the same machine (`python -m benchmarks`).

Not timed tests: each figure is the median of several runs, measured in the same run as its
anchors (`sqlite3 .backup`, `cp` + fsync), and compared with the targets of the performance
section of the backup-engine issue. Modules:
  dataset   builds (and caches) the WAL-mode databases and their 1%-updated twins
  pages     page-level comparison of two database files, independent of dbre
  worker    one dbre backup or restore in a child process (its peak RSS is the child's)
  run       the measurement rounds and the results document
  report    the rich table and the pass/fail checks
"""
