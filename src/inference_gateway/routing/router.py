"""Which servers answer for a model name: rewrites, then the model's replica set.

Lookups on the request path are dictionary reads. The sets change in the background (a DNS
name that resolves to other addresses, see ``upkeep``): a new address joins at once; one that
is gone is drained, then retired once its last request has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from inference_gateway.routing.replicas import Replica, ReplicaSet

DNS_PREFIX = "dns+"


@dataclass(frozen=True, slots=True)
class Route:
    served_model: str
    replicas: ReplicaSet


class Router:
    """Resolves a requested model name, following one rewrite, to its replica set."""

    def __init__(self, models: dict[str, tuple[str, ...]], rewrites: dict[str, str],
                 on_retired: Callable[[str], None] | None = None) -> None:
        self.sets: dict[str, ReplicaSet] = {}
        self.dns: dict[str, list[str]] = {}  # model → its DNS names (dns+http://name:port)
        for name, urls in models.items():
            replica_set = self.sets[name] = ReplicaSet(name)
            for url in urls:
                if url.startswith(DNS_PREFIX):
                    self.dns.setdefault(name, []).append(url)
                else:
                    replica_set.replicas.append(Replica(url))
        self._routes: dict[str, Route] = {n: Route(n, s) for n, s in self.sets.items()}
        for alias, target in rewrites.items():
            self._routes[alias] = Route(target, self.sets[target])
        self._on_retired = on_retired
        self._fixed = {name: {u for u in urls if not u.startswith(DNS_PREFIX)}
                       for name, urls in models.items()}

    def resolve(self, model: str) -> Route | None:
        return self._routes.get(model)

    def model_ids(self) -> list[str]:
        """Every name a client may send: served models first, then aliases, each sorted."""
        served = sorted(name for name, r in self._routes.items() if r.served_model == name)
        aliases = sorted(name for name, r in self._routes.items() if r.served_model != name)
        return served + aliases

    def replicas(self) -> Iterator[Replica]:
        for replica_set in self.sets.values():
            yield from replica_set.replicas

    def find(self, url: str) -> Replica | None:
        for replica in self.replicas():
            if replica.url == url:
                return replica
        return None

    def discovered(self, model: str, urls: set[str]) -> None:
        """What the model's DNS names resolve to now: add new replicas, drain the gone ones."""
        replica_set = self.sets[model]
        wanted = urls | self._fixed[model]
        for replica in replica_set.replicas:
            if replica.url not in wanted:
                replica.draining = True
            elif replica.draining:
                replica.draining = False  # it came back before it was retired
        known = {r.url for r in replica_set.replicas}
        replica_set.replicas.extend(Replica(url) for url in sorted(urls - known))

    def retire_drained(self) -> list[str]:
        """Remove the drained replicas that have no request left; returns their URLs."""
        gone: list[str] = []
        for replica_set in self.sets.values():
            done = [r for r in replica_set.replicas if r.draining and r.in_flight <= 0]
            if done:
                replica_set.replicas[:] = [r for r in replica_set.replicas if r not in done]
                gone += [r.url for r in done]
        if self._on_retired is not None:
            for url in gone:
                self._on_retired(url)
        return gone
