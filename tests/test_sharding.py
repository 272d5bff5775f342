"""Row sharding over a device mesh (gpadjoint.sharding): parity with one device, real sharding.

The multi-device checks run ``tests/_sharding_child.py`` in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (JAX fixes its device count when it
starts, so this process, which already runs JAX on one CPU device, cannot host them). float64,
n of a hundred or so; the child asserts (relative error <= 1e-10 against the single-device value
and gradient) and prints the errors it found, which the failure message shows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from gpadjoint.sharding import describe_mesh, keops_device_id, keops_route, make_mesh

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_sharding_child.py"


def run_child(*checks, devices=4, timeout=1800):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(CHILD), *checks], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    assert set(out) == set(checks), proc.stdout
    return out


# --- in this process (one CPU device) ---------------------------------------------------------


def test_make_mesh_validates_the_device_count():
    n = len(jax.devices())
    assert make_mesh(None) is None
    assert describe_mesh(None) == "single device"
    assert make_mesh(n).devices.size == n
    assert make_mesh("all").devices.size == n
    with pytest.raises(ValueError, match=f"{n + 7} devices were requested but only {n}"):
        make_mesh(n + 7)
    for bad in (0, -1, "some", True, 2.5):
        with pytest.raises(ValueError, match="devices must be"):
            make_mesh(bad)


def test_keops_device_id_follows_the_shards_device():
    gpus = [SimpleNamespace(platform="gpu", id=10 + i, local_hardware_id=i) for i in range(3)]
    assert [keops_device_id(d) for d in gpus] == [0, 1, 2]
    # a multi-host GPU: global id 9, the second GPU of its own host
    assert keops_device_id(SimpleNamespace(platform="gpu", id=9, local_hardware_id=1)) == 1
    assert keops_device_id(SimpleNamespace(platform="cpu", id=0)) == -1
    mesh = SimpleNamespace(devices=SimpleNamespace(flat=gpus[::-1]))
    # mesh position p -> the GPU holding shard p, whatever the order of the mesh
    assert keops_route(mesh) == (("GPU", 2), ("GPU", 1), ("GPU", 0))


# --- in a child process with 4 simulated devices ----------------------------------------------


@pytest.mark.slow
def test_every_kernel_value_and_gradient_match_one_device():
    errs = run_child("all_kernels")["all_kernels"]
    assert set(errs) == {"rbf", "matern12", "matern32", "matern52"}
    assert max(max(e.values()) for e in errs.values()) <= 1e-10


@pytest.mark.slow
def test_dense_uneven_rows_and_preconditioned_logdet_match_one_device():
    # dense: K stored as (n/4, n) row blocks; n = 130 is not a multiple of 4 (padded inside
    # the operator); precond_logdet runs the fused Lanczos on S K S
    out = run_child("parity:128:dense:rbf,matern12:0", "parity:130:blocked:matern32:1")
    for errs in out.values():
        assert max(max(e.values()) for e in errs.values()) <= 1e-10


@pytest.mark.slow
def test_arrays_are_sharded_and_memory_per_device_falls():
    out = run_child("operator", "memory:4096")
    assert out["operator"] == {"matvec": "P('rows',)", "lanczos_Q": "P(None, None, 'rows')"}
    mem = out["memory:4096"]
    assert mem["4"] < 0.35 * mem["1"]


@pytest.mark.slow
def test_fit_prediction_regressor_and_cli_on_four_devices(tmp_path):
    cli = f"cli:{tmp_path}"
    out = run_child("fit", "regressor", cli)
    assert max(out["fit"].values()) <= 1e-9
    assert max(out["regressor"].values()) <= 1e-9
    assert out[cli]["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def test_cli_says_how_many_devices_exist(tmp_path):
    from gpadjoint.cli import main

    n = len(jax.devices())
    with pytest.raises(SystemExit, match=f"--devices: {n + 3} devices were requested but only"):
        main(["fit", "--dataset", "yacht", "--epochs", "1", "--devices", str(n + 3),
              "--out", str(tmp_path / "r.json"), "--checkpoint", str(tmp_path / "r.ckpt")])


@pytest.mark.slow
@pytest.mark.keops
def test_keops_shards_run_per_device_and_match_one_device():
    from gpadjoint.keops_bridge import keops_available

    ok, why = keops_available()
    if not ok:
        pytest.skip(f"pykeops cannot run here: {why}")
    out = run_child("keops")["keops"]
    assert max(out["errs"]) <= 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_one_mesh_over_loopback():
    # multi-host in miniature: two processes with 2 CPU devices each, jax.distributed over a
    # loopback coordinator, gloo collectives; each process passes only its own rows
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, str(CHILD), f"multihost:{pid}:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=HERE.parent)
        for pid in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, out in enumerate(outs):
        res = out[f"multihost:{pid}:{port}"]
        assert res["pid"] == pid and max(res["errs"]) <= 1e-10
