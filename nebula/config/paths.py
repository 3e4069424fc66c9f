"""Input paths of a job config (model, datasets, teachers, resume checkpoint), and what a
relative one means.

`nebula run` runs in the caller's working directory, so a relative path means what it says
there. A submitted job runs elsewhere (the service's driver and Ray actors have their own
working directories), so `nebula submit` resolves every relative input path against the
submitter's working directory before sending, the same meaning as `nebula run`; the REST API
refuses a relative input path it receives (422 naming the field): it cannot know what it was
relative to. Output locations (output_dir, checkpoint.dir) are the service's to place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

# Per config class: its fields that name inputs on disk.
INPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "ModelConfig": ("path", "import_dir"), "DatasetConfig": ("path",),
    "TeacherModelConfig": ("path",), "JobConfig": ("resume_from",),
}


def input_paths(model: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(field location, value) of every input path set in a validated config tree."""
    if isinstance(model, BaseModel):
        for name in INPUT_FIELDS.get(type(model).__name__, ()):
            value = getattr(model, name)
            if isinstance(value, str) and value:
                yield loc + (name,), value
        for name in type(model).model_fields:
            yield from input_paths(getattr(model, name), loc + (name,))
    elif isinstance(model, (list, tuple)):
        for i, item in enumerate(model):
            yield from input_paths(item, loc + (i,))


def relative_input_paths(cfg: BaseModel) -> list[tuple[str, str]]:
    """(dotted field, value) of every relative input path."""
    return [(".".join(map(str, loc)), v) for loc, v in input_paths(cfg)
            if not Path(v).is_absolute()]


def resolve_input_paths(raw: dict[str, Any], cfg: BaseModel, base: Path) -> dict[str, Any]:
    """A copy of the raw config dict with every relative input path made absolute against
    `base` (`cfg` is `raw` validated; only fields present in `raw` are touched)."""
    import copy

    out = copy.deepcopy(raw)
    for loc, value in input_paths(cfg):
        if Path(value).is_absolute():
            continue
        node: Any = out
        try:
            for key in loc[:-1]:
                node = node[key]
            if node.get(loc[-1]) == value:
                node[loc[-1]] = str((base / value).resolve())
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # a value the config filled in itself, not the submitter's
    return out
