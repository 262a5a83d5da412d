"""Which model server answers for a model name. Pure lookups, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    served_model: str
    upstream: str  # base URL, no trailing slash


class Router:
    """Resolves a requested model name, following one rewrite, to its upstream."""

    def __init__(self, models: dict[str, str], rewrites: dict[str, str]) -> None:
        self._routes: dict[str, Route] = {
            name: Route(name, url) for name, url in models.items()
        }
        for alias, target in rewrites.items():
            self._routes[alias] = Route(target, models[target])

    def resolve(self, model: str) -> Route | None:
        return self._routes.get(model)

    def upstreams(self) -> list[str]:
        return sorted({route.upstream for route in self._routes.values()})

    def model_ids(self) -> list[str]:
        """Every name a client may send: served models first, then aliases, each sorted."""
        served = sorted(name for name, r in self._routes.items() if r.served_model == name)
        aliases = sorted(name for name, r in self._routes.items() if r.served_model != name)
        return served + aliases
