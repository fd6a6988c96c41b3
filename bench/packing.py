"""Benchmark: sharing GPUs by memory. A deterministic simulation (no processes, no database) of one host with
8 GPUs (2 of 80 GiB, 6 of 24 GiB: 304 GiB for about 280 GiB of models, so that room must be made) and 30 models from 0.3 to 40 GiB, fed the same trace of 2,000 requests with
Zipf-distributed popularity, under three rules:

- one-per-gpu: today's rule before sharing (a GPU holds one model; no eviction, idle unload only),
- ollama: at most 3 models per GPU, sizes taken as given, the least recently used idle model evicted
  (anywhere) until the new one fits,
- ours: the controller's own code — models_app.eviction.choose_victims picks the victims (the fewest idle
  instances on one GPU set, least recently used first), and the claim arithmetic of models_app.claims
  decides what fits (estimate + headroom per instance on each GPU; a GPU admits a load only while claims + the
  new claim <= its memory), placement packing best fit.

A second part replays two users on the same GPUs, with and without quotas (policy/rules.py decides: a claim
beyond the user's quota is borrowed, may not make room, and is reclaimed first): each user's 503s, 429s,
waits and share of the claimed memory against the quota.

Every rule answers a request for a model that is loading by joining that load, unloads models idle for the
keep-alive, and refuses (a 503) a request it cannot place. After every step the simulation asserts that, on
each GPU, the memory of the processes alive never exceeds the GPU's memory (and, for ours, that the admitted
claims do not either). Output: one line per rule (503s, loads, mean memory in use) and the ratios the issue
asks for.

    .venv/bin/python bench/packing.py                    # the default trace (seed 1)
    .venv/bin/python bench/packing.py --seeds 1,2,3,4,5  # several traces: the medians
"""

import argparse
import heapq
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models_app.claims import GpuClaims, Holder, new_claim_mib  # noqa: E402
from models_app.eviction import Resident, choose_victims, why_kept  # noqa: E402
from policy import rules as quota_rules  # noqa: E402
from policy.reasons import PolicyRefusal  # noqa: E402

GIB = 1024
GPU_SIZES_MIB = [80 * GIB] * 2 + [24 * GIB] * 6
MODELS = 30
REQUESTS = 2000
MEAN_GAP_S = 3.0  # between request arrivals (Poisson)
REQUEST_S = (2.0, 30.0)  # how long a request keeps its model busy (uniform)
KEEP_ALIVE_S = 1800.0  # idle unload for every rule (the product's default LLAMACONTROLLER_KEEP_ALIVE_SECONDS)
STOP_S = 1.0
HEADROOM_MIB = 512  # the product's default LLAMACONTROLLER_GPU_HEADROOM_MIB
MIN_IDLE_S = 60.0  # LLAMACONTROLLER_EVICT_MIN_IDLE_SECONDS (the product's default)
MIN_RESIDENCY_S = 120.0  # LLAMACONTROLLER_EVICT_MIN_RESIDENCY_SECONDS (the product's default)
OLLAMA_MAX_PER_GPU = 3


def load_seconds(size_mib: int) -> float:
    return 1.0 + size_mib / GIB * 0.5  # ~2 GiB/s from the page cache


@dataclass
class Model:
    name: str
    size_mib: int  # what its process really uses (measured)
    estimate_mib: int  # what the controller predicts before load (within a few % above, as calibrated)


@dataclass
class Instance:
    pk: int
    model: Model
    gpu: int
    claim_mib: int
    loaded_at: float  # when it became ready (start + load time)
    last_used: float
    in_flight: int = 0
    stopping_until: float | None = None
    waits_for: list = field(default_factory=list)  # victims that must exit before its process starts
    owner: str = ""  # the user whose request loaded it (their quota counts its claim)

    def ready(self, now: float) -> bool:
        return self.stopping_until is None and now >= self.loaded_at

    def process_alive(self, now: float) -> bool:
        if self.stopping_until is not None:
            return now < self.stopping_until
        return not self.waits_for or all(v.stopping_until <= now for v in self.waits_for)


def make_models(rng: random.Random) -> list[Model]:
    low, high = math.log(0.3 * GIB), math.log(40 * GIB)
    models = []
    for n in range(MODELS):
        size = int(math.exp(rng.uniform(low, high)))
        models.append(Model(f"model-{n:02d}", size, int(size * rng.uniform(1.0, 1.08))))
    return models


def make_trace(rng: random.Random, models: list[Model]) -> list[tuple[float, Model, float]]:
    order = models[:]
    rng.shuffle(order)  # popularity unrelated to size
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(order))]
    now, trace = 0.0, []
    for _ in range(REQUESTS):
        now += rng.expovariate(1 / MEAN_GAP_S)
        trace.append((now, rng.choices(order, weights)[0], rng.uniform(*REQUEST_S)))
    return trace


class Cluster:
    """Instances on GPUs, advanced in time; the rules differ only in `place`."""

    def __init__(self, rule: str, quotas: dict | None = None):
        self.rule = rule
        self.quotas = quotas or {}  # user -> policy.rules.Limits (none: unlimited)
        self.users: dict[str, dict] = {}  # per user: requests, 503s, 429s, waits, claim x seconds
        self.instances: list[Instance] = []
        self.pk = 0
        self.loads = 0
        self.refused = 0
        self.evicted = 0
        self.memory_time = 0.0  # MiB x seconds of live processes
        self.clock = 0.0
        self.ends: list[tuple[float, int, Instance]] = []  # request ends (heap)

    # --- time ---
    def advance(self, now: float) -> None:
        while self.ends and self.ends[0][0] <= now:
            at, _, instance = heapq.heappop(self.ends)
            self._account(at)
            instance.in_flight -= 1
            instance.last_used = at
        self._account(now)
        for instance in list(self.instances):
            if instance.stopping_until is not None and instance.stopping_until <= now:
                self.instances.remove(instance)
            elif (
                instance.stopping_until is None
                and instance.in_flight == 0
                and instance.ready(now)
                and now - max(instance.last_used, instance.loaded_at) >= KEEP_ALIVE_S
            ):
                instance.stopping_until = now + STOP_S
        self.check(now)

    def _account(self, now: float) -> None:
        if now > self.clock:
            alive = sum(i.model.size_mib for i in self.instances if i.process_alive(self.clock))
            self.memory_time += alive * (now - self.clock)
            for i in self.instances:
                if i.owner and i.stopping_until is None:
                    self.user(i.owner)["claim_time"] += i.claim_mib * (now - self.clock)
            self.clock = now

    def user(self, name: str) -> dict:
        return self.users.setdefault(
            name, {"requests": 0, "503": 0, "429": 0, "waits": [], "claim_time": 0.0}
        )

    def check(self, now: float) -> None:
        for gpu, total in enumerate(GPU_SIZES_MIB):
            alive = sum(i.model.size_mib for i in self.instances if i.gpu == gpu and i.process_alive(now))
            assert alive <= total, f"{self.rule}: GPU {gpu} runs {alive} MiB of {total} at {now:.1f} s"
            if self.rule == "ours":
                admitted = sum(i.claim_mib for i in self.instances if i.gpu == gpu and not self._replaced(i))
                assert admitted <= total, f"ours: GPU {gpu} admitted {admitted} MiB of {total}"

    def _replaced(self, instance: Instance) -> bool:
        return instance.stopping_until is not None and any(instance in i.waits_for for i in self.instances)

    # --- requests ---
    def request(self, now: float, model: Model, seconds: float, user: str = "") -> None:
        self.advance(now)
        stats = self.user(user)
        stats["requests"] += 1
        current = next((i for i in self.instances if i.model is model and i.stopping_until is None), None)
        if current is None:
            self.requester = user
            try:
                current = self.place(now, model)
            except PolicyRefusal:  # beyond the requester's quota where room would have to be made: 429
                stats["429"] += 1
                return
            if current is None:
                self.refused += 1
                stats["503"] += 1
                return
            current.owner = user
        start = max(now, current.loaded_at)  # joins a load under way
        stats["waits"].append(start - now)
        current.in_flight += 1
        current.last_used = now
        self.pk += 1
        heapq.heappush(self.ends, (start + seconds, self.pk, current))

    def start(self, now: float, model: Model, gpu: int, claim: int, victims: list[Instance]) -> Instance:
        for victim in victims:
            victim.stopping_until = now + STOP_S
        self.evicted += len(victims)
        self.pk += 1
        begin = max([now] + [v.stopping_until for v in victims])
        instance = Instance(
            self.pk, model, gpu, claim, begin + load_seconds(model.size_mib), now, 0, None, victims
        )
        self.instances.append(instance)
        self.loads += 1
        return instance

    def on(self, gpu: int, now: float) -> list[Instance]:
        return [
            i for i in self.instances if i.gpu == gpu and (i.stopping_until is None or i.stopping_until > now)
        ]

    def place(self, now: float, model: Model) -> Instance | None:
        return getattr(self, f"_place_{self.rule.replace('-', '_')}")(now, model)

    def _place_one_per_gpu(self, now, model):
        free = [g for g, total in enumerate(GPU_SIZES_MIB) if not self.on(g, now) and model.size_mib <= total]
        if not free:
            return None
        gpu = min(free, key=lambda g: GPU_SIZES_MIB[g])  # the smallest GPU that fits
        return self.start(now, model, gpu, GPU_SIZES_MIB[gpu], [])

    def _place_ollama(self, now, model):
        while True:
            fits = [
                g
                for g, total in enumerate(GPU_SIZES_MIB)
                if len(self.on(g, now)) < OLLAMA_MAX_PER_GPU
                and sum(i.model.size_mib for i in self.on(g, now)) + model.size_mib <= total
            ]
            if fits:
                gpu = min(
                    fits, key=lambda g: GPU_SIZES_MIB[g] - sum(i.model.size_mib for i in self.on(g, now))
                )
                waits = [i for i in self.instances if i.gpu == gpu and i.stopping_until is not None]
                return (
                    self.start(now, model, gpu, model.size_mib, [])
                    if not waits
                    else self._after(now, model, gpu, waits)
                )
            idle = [
                i for i in self.instances if i.stopping_until is None and i.in_flight == 0 and i.ready(now)
            ]
            if not idle:
                return None
            victim = min(idle, key=lambda i: (i.last_used, i.pk))  # the least recently used, anywhere
            victim.stopping_until = now + STOP_S
            self.evicted += 1

    def _after(self, now, model, gpu, waits):
        instance = self.start(now, model, gpu, model.size_mib, [])
        instance.waits_for = waits
        instance.loaded_at = max(w.stopping_until for w in waits) + load_seconds(model.size_mib)
        return instance

    def _room(self, gpu: int, now: float) -> GpuClaims:
        """The GPU as admission sees it (models_app.claims): each instance's estimate while it loads, then the
        larger of estimate and measured, plus the headroom."""
        holders = tuple(
            Holder(
                i.pk,
                i.model.name,
                "running" if i.ready(now) else "starting",
                estimate_mib=i.model.estimate_mib,
                measured_mib=i.model.size_mib,
            )
            for i in self.on(gpu, now)
        )
        return GpuClaims(gpu, gpu, GPU_SIZES_MIB[gpu], 0, holders, HEADROOM_MIB)

    def _place_ours(self, now, model):
        claim = new_claim_mib(model.estimate_mib, HEADROOM_MIB)
        rooms = [self._room(g, now) for g in range(len(GPU_SIZES_MIB))]
        fitting = [(room.left_after_mib(claim), room.gpu_id) for room in rooms if room.fits(claim)]
        decision = self._quota_decision(model, claim)
        if fitting:  # pack (placement's default): the least memory left over
            decision.check(needs_room=False)
            _, gpu = min(fitting)
            return self.start(now, model, gpu, claim, [])
        decision.check(needs_room=True)  # a borrowed load may not make room: 429
        borrowed = self._borrowed()
        # eviction's candidates: the GPUs the model fits when empty, smallest first
        order = sorted((r for r in rooms if claim <= r.total_mib), key=lambda r: (r.total_mib, r.gpu_id))
        candidates = [((r.gpu_id,), {r.gpu_id: claim - r.free_mib}) for r in order]
        residents = {}
        for room in rooms:
            for holder in room.holders:
                i = next(x for x in self.instances if x.pk == holder.instance_id)
                residents[i.pk] = (
                    i,
                    Resident(
                        i.pk,
                        i.model.name,
                        {room.gpu_id: room.claim_of(holder)},
                        idle_since=i.last_used,
                        borrowed=i.pk in borrowed,
                        why_kept=why_kept(
                            status=holder.status,
                            evictable_kind=True,
                            in_flight=i.in_flight,
                            idle_seconds=now - i.last_used,
                            resident_seconds=now - i.loaded_at,
                            min_idle_seconds=MIN_IDLE_S,
                            min_residency_seconds=MIN_RESIDENCY_S,
                            borrowed=i.pk in borrowed,
                        ),
                    ),
                )
        plan = choose_victims(candidates, [r for _, r in residents.values()])
        if plan is None:
            return None
        victims = [residents[v.instance_id][0] for v in plan.victims]
        return self.start(now, model, plan.gpus[0], claim, victims)

    def _claims_of(self, user: str) -> list:
        return [
            quota_rules.Claim(i.pk, i.model.name, (i.gpu,), i.claim_mib)
            for i in sorted(self.instances, key=lambda i: i.pk)
            if i.owner == user and i.stopping_until is None
        ]

    def _quota_decision(self, model: Model, claim: int):
        """The policy's rules (policy/rules.py) for the requester's new claim."""
        limits = self.quotas.get(self.requester, quota_rules.Limits())
        new = quota_rules.Claim(None, model.name, (), claim)
        return quota_rules.decide(limits, self._claims_of(self.requester), new)

    def _borrowed(self) -> set:
        """Instances beyond their owner's quota (policy/rules.py standings): reclaimed first."""
        out = set()
        for user, limits in self.quotas.items():
            marks = quota_rules.standings(limits, self._claims_of(user))
            out |= {pk for pk, standing in marks.items() if standing == quota_rules.BORROWED}
        return out


# --- two users and their quotas (issue 20) ----------------------------------------------------------------

TEAM = {  # user: (its models, mean seconds between its requests, its quota's share of all GPU memory)
    "heavy": (range(0, 20), 1.5, 0.5),
    "light": (range(20, 30), 12.0, 0.25),
}


def make_team_trace(rng: random.Random, models: list[Model]) -> list[tuple[float, Model, float, str]]:
    """The heavy user floods (a request every 1.5 s on average over 20 models); the light one asks every 12 s
    for one of its own 10 models. Merged by time, the first REQUESTS requests."""
    trace = []
    for user, (own, gap, _) in TEAM.items():
        mine = [models[n] for n in own]
        weights = [1 / (rank + 1) ** 1.1 for rank in range(len(mine))]
        now = 0.0
        for _ in range(REQUESTS):
            now += rng.expovariate(1 / gap)
            trace.append((now, rng.choices(mine, weights)[0], rng.uniform(*REQUEST_S), user))
    return sorted(trace, key=lambda r: r[0])[:REQUESTS]


def run_team(trace, with_quotas: bool) -> dict:
    total = sum(GPU_SIZES_MIB)
    quotas = {
        user: quota_rules.Limits(gpu_memory_mib=int(total * share)) for user, (_, _, share) in TEAM.items()
    }
    cluster = Cluster("ours", quotas if with_quotas else None)
    for now, model, seconds, user in trace:
        cluster.request(now, model, seconds, user)
    end = trace[-1][0]
    cluster.advance(end)
    out = {}
    for user, stats in cluster.users.items():
        waits = sorted(stats["waits"])
        out[user] = {
            "requests": stats["requests"],
            "503": stats["503"],
            "429": stats["429"],
            "wait_p50": statistics.median(waits) if waits else 0.0,
            "wait_p95": waits[int(0.95 * (len(waits) - 1))] if waits else 0.0,
            "share_pct": 100 * stats["claim_time"] / end / total,
            "quota_pct": 100 * TEAM[user][2],
        }
    return out


def main_team(seeds: list[int]) -> None:
    print(
        "\ntwo users on the same GPUs: heavy floods (quota 50 % of the memory), light asks now and then (quota 25 %)"
    )
    print("| quotas | user | requests | 503s | 429s (quota) | wait p50 / p95 | share of GPU memory claimed |")
    print("|---|---|---|---|---|---|---|")
    for with_quotas in (False, True):
        runs = []
        for seed in seeds:
            rng = random.Random(seed)
            models = make_models(rng)
            runs.append(run_team(make_team_trace(rng, models), with_quotas))
        for user in TEAM:
            m = {k: statistics.median(r[user][k] for r in runs) for k in runs[0][user]}
            print(
                f"| {'on' if with_quotas else 'off'} | {user} | {m['requests']:g} | {m['503']:g} | {m['429']:g} "
                f"| {m['wait_p50']:.1f} s / {m['wait_p95']:.1f} s | {m['share_pct']:.1f} % (quota {m['quota_pct']:g} %) |"
            )
    print("(medians over the traces; a wait is 0 when the model runs, else its load, after its victims stop)")


def run(rule: str, trace) -> dict:
    cluster = Cluster(rule)
    for now, model, seconds in trace:
        cluster.request(now, model, seconds)
    end = trace[-1][0]
    cluster.advance(end)
    total = sum(GPU_SIZES_MIB)
    return {
        "rule": rule,
        "refused": cluster.refused,
        "loads": cluster.loads,
        "evicted": cluster.evicted,
        "memory_in_use_pct": round(100 * cluster.memory_time / end / total, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="1", help="trace seeds, comma-separated (default 1)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rules = ["one-per-gpu", "ollama", "ours"]
    results = {rule: [] for rule in rules}
    for seed in seeds:
        rng = random.Random(seed)
        models = make_models(rng)
        trace = make_trace(rng, models)
        for rule in rules:
            results[rule].append(run(rule, trace))
            r = results[rule][-1]
            print(
                f"seed {seed} {rule:12s} 503s {r['refused']:5d}  loads {r['loads']:4d}  evicted {r['evicted']:4d}"
                f"  memory in use {r['memory_in_use_pct']:5.1f} %"
            )
    med = {
        rule: {
            k: statistics.median(r[k] for r in results[rule])
            for k in ("refused", "loads", "evicted", "memory_in_use_pct")
        }
        for rule in rules
    }
    print(
        f"\nmedians over {len(seeds)} trace(s) of {REQUESTS} requests, 8 GPUs (2 x 80 GiB, 6 x 24 GiB), {MODELS} models:"
    )
    print("| rule | 503s | loads | evictions | mean memory in use |")
    print("|---|---|---|---|---|")
    for rule in rules:
        m = med[rule]
        print(
            f"| {rule} | {m['refused']:g} | {m['loads']:g} | {m['evicted']:g} | {m['memory_in_use_pct']:g} % |"
        )
    ours, today, ollama = med["ours"], med["one-per-gpu"], med["ollama"]
    ratio = today["refused"] / ours["refused"] if ours["refused"] else math.inf
    print(
        f"\n503s: one-per-gpu / ours = {ratio:.1f}x (target >= 5x); loads: ours {ours['loads']:g} vs ollama {ollama['loads']:g} (target: fewer)"
    )
    print("every step checked: no GPU ran more than its memory; ours never admitted claims over it")
    main_team(seeds)


if __name__ == "__main__":
    main()
