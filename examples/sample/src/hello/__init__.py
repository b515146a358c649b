"""A tiny package to import straight from the mount: PYTHONPATH=/tmp/blobmount-sample/src python3 -m hello"""
