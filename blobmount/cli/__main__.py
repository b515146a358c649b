"""`python -m blobmount.cli`: the `blobmount` command."""

from blobmount.cli import run

run()
