"""Launching scaling sweeps and reading back their results.

- `python -m launch.sweep --sweep=configs/sweeps/X.py --backend=local|tpu-vm [--dry_run]`: run every
  run of a sweep (`local.py`: subprocesses on this machine; `tpu_vm.py`: Cloud TPU VMs via gcloud).
- `python -m launch.collect --sweep_dir=DIR`: every run's summary.json and curves in one table.
- `python -m launch.analyze --sweep_dir=DIR`: Kaplan and Chinchilla fits, printed and plotted.
"""
