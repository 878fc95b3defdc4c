"""A model spec for the launcher tests: no upstream, the entry point is toy_train.py next to this file."""
from pathlib import Path

from bevkit.models import ModelSpec

HERE = Path(__file__).resolve().parent


def build_entry(request):
    return [str(HERE / "toy_train.py"), *request.extra_args]


SPEC = ModelSpec(name="toy", display_name="Toy", upstream="", samples_per_device=4, build_entry=build_entry)
