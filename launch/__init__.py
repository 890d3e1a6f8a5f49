"""Launchers of `maskjax train` on many hosts: tpu.py (TPU pods via gcloud), local.py (localhost)."""
