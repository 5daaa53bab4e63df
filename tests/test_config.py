"""The schema refuses bad configurations with one line naming the key, before any work starts."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord

from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.simulation import backend_config, check_placement, concurrent_clients, num_simulated_nodes


def test_default_config_composes():
    rc = compose_config([])
    assert rc.dataset.name == "digits"
    assert rc.privacy.mode == "none"
    assert rc.train.lr == 0.1  # the data set's recipe overrides the root default


def test_overrides_and_groups():
    rc = compose_config("dataset=fashion_mnist partition=dirichlet partition.alpha=0.3 num_clients=100 clients_per_round=10 strategy=fedadam seed=1")
    assert (rc.dataset.name, rc.partition.scheme, rc.partition.alpha, rc.strategy.name, rc.seed) == (
        "fashion_mnist", "dirichlet", 0.3, "fedadam", 1)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ("partition=dirichlet partition.alpha=0", "partition.alpha"),
        ("partition=dirichlet partition.alpha=-1", "partition.alpha"),
        ("num_clients=5 clients_per_round=6", "clients_per_round"),
        ("train.lr=-0.1", "train.lr"),
        ("+dataset.colour=red", "dataset.colour"),
        ("+trian.lr=0.1", "trian"),
        ("sampling=sometimes", "sampling"),
        ("num_rounds=0", "num_rounds"),
        ("train.batch_size=abc", "train.batch_size"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_unknown_group_option_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        compose_config("dataset=imagenet")
    assert "imagenet" in str(info.value) and "fashion_mnist" in str(info.value)


def test_gpu_placement_without_gpu_is_refused():
    rc = compose_config("placement=gpu")
    with pytest.raises(ConfigError, match="placement"):
        check_placement(rc.placement, gpus_available=0)
    check_placement(rc.placement, gpus_available=1)  # fine where a GPU exists


def test_ray_resource_mapping():
    gpu = compose_config("placement=gpu").placement
    cfg = backend_config(gpu)
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert concurrent_clients(gpu, cpus=16, gpus=2) == 8  # 2 GPUs / 0.25
    assert concurrent_clients(gpu, cpus=4, gpus=2) == 4  # CPU-bound
    cpu = compose_config("placement=cpu placement.num_cpus_per_client=0.5").placement
    assert concurrent_clients(cpu, cpus=2) == 4


def test_a_placement_the_machine_cannot_host_is_refused_quickly():
    import socket

    too_big = compose_config("placement.num_cpus_per_client=64 placement.num_cpus=2").placement
    with pytest.raises(ConfigError, match="num_cpus_per_client"):
        check_placement(too_big, gpus_available=0)
    for address in (None, "auto"):  # never join whatever cluster runs here
        cluster = compose_config("placement=cluster" + (f" placement.address={address}" if address else "")).placement
        with pytest.raises(ConfigError, match="HOST:PORT"):
            check_placement(cluster, gpus_available=0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    silent = compose_config(f"placement=cluster placement.address=127.0.0.1:{port}").placement
    with pytest.raises(ConfigError, match="no Ray head answers"):  # within the 5 s connect timeout
        check_placement(silent, gpus_available=0)
    with socket.socket() as head:  # a head that answers: accepted, its resources not counted here
        head.bind(("127.0.0.1", 0))
        head.listen()
        there = compose_config(f"placement=cluster placement.address=127.0.0.1:{head.getsockname()[1]}").placement
        check_placement(there, gpus_available=0)
        assert backend_config(there)["init_args"]["address"] == there.address


def test_simulated_nodes_are_the_workers_not_the_clients():
    rc = compose_config("num_clients=10000 clients_per_round=50")
    assert num_simulated_nodes(rc) == concurrent_clients(rc.placement)  # one node per worker (Ray actor)
    rc = compose_config("num_clients=10 clients_per_round=10 sampling=all placement.num_nodes=3")
    assert num_simulated_nodes(rc) == 3


def test_each_worker_gets_one_balanced_share_of_the_cohort(flower_run_identity):
    from fedpriv.engine import Population
    from fedpriv.sampling import ClientSampler

    class Nodes:
        def get_node_ids(self):
            return [101, 102, 103]

    rc = compose_config("num_clients=20 clients_per_round=10")
    population = Population(Nodes(), rc, ClientSampler("poisson", 20, 10, 0))
    for cohort in ([0, 1, 2, 3, 4, 5, 6], [1, 4], []):
        messages = population.messages(cohort, 1, ArrayRecord(), {"task": "{}"})
        assert len(messages) == min(3, len(cohort))  # one message per worker, none empty
        shares = [list(m.content["config"]["client-ids"]) for m, _ in messages]
        assert sorted(c for share in shares for c in share) == sorted(cohort)
        assert [len(sh) for sh in shares] == [n for _, n in messages]
        assert max(map(len, shares), default=0) - min(map(len, shares), default=0) <= 1
        assert len({int(m.metadata.dst_node_id) for m, _ in messages}) == len(messages)


def test_a_presets_non_private_twin_composes_but_a_users_unread_key_is_refused():
    """experiment=quickstart privacy=none: the preset's privacy values do not apply and are reset;
    the same value typed by the user is refused (it would be silently ignored)."""
    twin = compose_config("experiment=quickstart privacy=none")
    assert twin.privacy.mode == "none" and twin.privacy.target_epsilon is None
    assert twin.privacy.clipping == "fixed" and twin.num_clients == 300  # the rest of the preset stays
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        compose_config("privacy=none privacy.target_epsilon=8")
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        compose_config("experiment=quickstart privacy=none privacy.target_epsilon=8")


def test_a_presets_value_the_chosen_option_does_not_read_is_dropped_and_said():
    """experiment=quickstart privacy=distributed: the preset's adaptive clipping is central DP's; it is
    dropped (one note line each), never silently, and refused when the user typed it."""
    from fedpriv.config import parse_config

    container = {"privacy": {"mode": "distributed", "target_epsilon": 8.0, "clipping": "adaptive"}}
    dropped: list[str] = []
    rc = parse_config(container, set(), dropped)
    assert rc.privacy.clipping == "fixed"
    assert dropped == ["privacy.clipping=adaptive (set by a preset) is not read with privacy=distributed: dropped"]
    with pytest.raises(ConfigError, match="privacy.clipping"):
        parse_config(container, {"privacy.clipping"}, [])
