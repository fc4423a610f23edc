"""Joining a multi-host run, and stopping on SIGTERM, in every environment a run may start in.

Each cluster is faked by its environment variables (and, for a Cloud TPU VM, a local stand-in for
the GCE metadata server); `jax.distributed.initialize` is replaced by a recorder that resolves its
arguments with JAX's own cluster detection, so a test shows what JAX would have connected to.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import jax
import pytest
from jax._src.clusters import ClusterEnv, cloud_tpu_cluster

from lmjax import distributed
from lmjax.train import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS",
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY", "GCE_METADATA_IP",
    "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "KUBERNETES_SERVICE_HOST",
)


@pytest.fixture
def laptop(monkeypatch):
    """No cluster variables, no TPU chips (importing jax on a chipless machine with libtpu sets
    TPU_SKIP_MDS_QUERY; it is removed too, so the TPU VM tests reach the fake metadata server)."""
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    # JAX's TPU clusters imported the flag by name: patch it where they read it.
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    for var in ("no_proxy", "NO_PROXY"):  # the fake metadata server is reached directly
        monkeypatch.setenv(var, "127.0.0.1")


@pytest.fixture
def calls(monkeypatch):
    """Records each `jax.distributed.initialize` call as (the detection method it names, and the
    (coordinator address, process count, process id) JAX resolves from its arguments and the environment)."""
    recorded = []

    def fake_initialize(coordinator_address=None, num_processes=None, process_id=None,
                        cluster_detection_method=None, **unused):
        resolved = (coordinator_address, num_processes, process_id, None)
        if cluster_detection_method != "deactivate":
            resolved = ClusterEnv.auto_detect_unset_distributed_params(
                coordinator_address, num_processes, process_id, None, cluster_detection_method, 5)
        recorded.append((cluster_detection_method, resolved[:3]))

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    return recorded


@pytest.fixture
def metadata_server(monkeypatch):
    """A GCE metadata server on localhost; tests fill in `attributes` (HTTP 404 for the rest)."""
    attributes: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            prefix = "/computeMetadata/v1/instance/attributes/"
            key = self.path[len(prefix):] if self.path.startswith(prefix) else None
            if self.headers.get("Metadata-Flavor") != "Google" or key not in attributes:
                self.send_error(404)
                return
            body = attributes[key].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    yield attributes
    server.shutdown()
    server.server_close()


def test_a_laptop_does_not_initialize(laptop, calls):
    assert distributed.cluster_kind() is None
    assert distributed.initialize() is None
    assert calls == []


def test_a_cloud_tpu_vm_pod_slice_is_found_through_the_metadata_server(laptop, calls, metadata_server, monkeypatch):
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    metadata_server.update({
        "agent-worker-number": "2",
        "worker-network-endpoints": "10.130.0.11,10.130.0.12,10.130.0.13,10.130.0.14",
        "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-16'\n",
    })
    assert distributed.initialize() == "gcetpu"
    assert calls == [("gcetpu", ("10.130.0.11:8482", 4, 2))]


def test_a_single_tpu_vm_host_initializes_as_one_process(laptop, calls, metadata_server, monkeypatch):
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    metadata_server.update({"agent-worker-number": "0", "worker-network-endpoints": "10.130.0.11", "tpu-env": ""})
    assert distributed.initialize() == "gcetpu"
    assert calls == [("gcetpu", ("10.130.0.11:8482", 1, 0))]


def test_a_tpu_vm_without_worker_metadata_does_not_initialize(laptop, calls, metadata_server, monkeypatch):
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    # No attributes: every key answers 404, as on a VM that is not a TPU VM worker.
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # JAX asks six times
    assert distributed.initialize() is None
    assert calls == []


def test_a_gke_tpu_pod_is_found_through_its_worker_variables(laptop, calls, metadata_server, monkeypatch):
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    metadata_server["tpu-env"] = ""
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # JAX asks for a TPU VM worker number first, 6 times
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "tpu-job-0.svc,tpu-job-1.svc")
    monkeypatch.setenv("TPU_WORKER_ID", "1")
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "10.8.0.4")  # JAX waits until process 0 resolves
    assert distributed.initialize() == "gketpu"
    assert calls == [("gketpu", ("tpu-job-0.svc:8482", 2, 1))]


def test_a_slurm_job_is_found_through_its_task_variables(laptop, calls, monkeypatch):
    for var, value in {"SLURM_JOB_ID": "4100", "SLURM_STEP_NODELIST": "gpu[003-006]", "SLURM_NTASKS": "4",
                       "SLURM_PROCID": "3", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    assert distributed.initialize() == "slurm"
    [(method, (address, count, index))] = calls
    assert (method, address.split(":")[0], count, index) == ("slurm", "gpu003", 4, 3)


def test_an_open_mpi_job_is_found_through_its_launcher_uri(laptop, calls, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert distributed.initialize() == "ompi"
    [(method, (address, count, index))] = calls
    assert (method, address.split(":")[0], count, index) == ("ompi", "10.96.0.1", 2, 1)


def test_explicit_variables_are_passed_as_they_are(laptop, calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize() == "explicit"
    assert calls == [("deactivate", ("localhost:1234", 2, 1))]


def test_a_coordinator_address_alone_is_a_named_error(laptop, calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.initialize()
    assert calls == []


def test_a_coordinator_address_on_a_cluster_overrides_only_the_address(laptop, calls, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "head-node:9999")
    assert distributed.initialize() == "ompi"
    assert calls == [("ompi", ("head-node:9999", 8, 5))]


def test_an_initialized_runtime_is_left_alone(laptop, calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.initialize() is None
    assert calls == []


def test_sigterm_sets_the_flag_when_not_distributed_and_the_old_handler_comes_back():
    assert not jax.distributed.is_initialized()
    before = signal.getsignal(signal.SIGTERM)
    with preemption.stop_on_sigterm() as sigterm:
        assert not preemption.preempted(sigterm, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.preempted(sigterm, 2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_initialized_process_leaves_sigterm_to_the_preemption_sync_point(monkeypatch):
    asked = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                        lambda step: asked.append(step) or step == 7)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.stop_on_sigterm() as sigterm:
        assert signal.getsignal(signal.SIGTERM) is before  # JAX's C handler must stay in place
        sigterm[0] = True  # what our handler would have set: ignored here
        assert [preemption.preempted(sigterm, step) for step in (6, 7)] == [False, True]
    assert asked == [6, 7]


def test_one_initialized_process_stops_at_the_sync_point_after_sigterm(tmp_path):
    """The real thing, in a child process: JAX's preemption service with a single process."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent("""
        import os, signal, time
        from lmjax import distributed
        from lmjax.train import preemption
        assert distributed.initialize() == "explicit" and preemption.uses_sync_point()
        with preemption.stop_on_sigterm() as sigterm:
            for step in range(1, 1000):
                if step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                if preemption.preempted(sigterm, step):
                    print("stopped at", step, flush=True)
                    break
                time.sleep(0.02)
    """)
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="1",
               JAX_PROCESS_ID="0", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = int(result.stdout.split("stopped at")[1])
    assert 5 < stopped < 1000
