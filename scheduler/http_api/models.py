"""`GET /v1/models`: the registered models in OpenAI's list shape, with a `torpor` object
giving each one's state, the tier it would be restored from, and the core's estimate of
that restore."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torpor.scheduler.core.costs import restore_seconds
from torpor.scheduler.labels import STATE_LABELS, TIER_LABELS

if TYPE_CHECKING:
    from torpor.scheduler.controller import Controller
    from torpor.scheduler.registry import ModelRegistry

OWNER = "torpor"


def model_list(models: ModelRegistry, controller: Controller) -> dict[str, Any]:
    state = controller.state
    data = []
    for name in models.names():
        model = state.models.get(name)
        registered = models.registered.get(name)
        if model is None or registered is None:  # unregistered meanwhile
            continue
        rt = state.runtimes[model.runtime_id]
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(registered.created_at.timestamp()),
                "owned_by": OWNER,
                "torpor": {
                    "state": STATE_LABELS[rt.state],
                    "tier": TIER_LABELS[rt.at.tier],
                    "restore_estimate_s": round(
                        restore_seconds(rt.at, model.spec.footprint, state.costs), 4
                    ),
                    "pinned": model.spec.pinned,
                },
            }
        )
    return {"object": "list", "data": data}
