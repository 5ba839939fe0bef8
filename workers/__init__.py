"""RQ worker side: job functions (jobs.py) and the worker entry point (`python -m workers`)."""
