"""submit and status against a small fake Kubernetes API server on 127.0.0.1.

The server records every request and answers with the API's documented shapes: the applied
object (with uid and resourceVersion) for an apply, a Status object for an error, the stored
PyTorchJob and a PodList for status.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from jcl_k8s import cli
from jcl_k8s.k8s.api import Cluster, ClusterError, job_status, submit
from jcl_k8s.k8s.render import render_values


class FakeApi(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = []
        self.errors = {}  # path -> (status, Status body)
        self.objects = {}  # path -> object for GET
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, *args):
        pass

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        parts = urlsplit(self.path)
        request = {
            "method": self.command, "path": parts.path, "query": parse_qs(parts.query),
            "content_type": self.headers.get("Content-Type"),
            "authorization": self.headers.get("Authorization"), "body": body,
        }
        self.server.requests.append(request)
        return request

    def do_PATCH(self):
        request = self._record()
        if request["path"] in self.server.errors:
            return self._answer(*self.server.errors[request["path"]])
        obj = json.loads(request["body"])
        obj["metadata"].update(uid="0000-1111", resourceVersion="42",
                               creationTimestamp="2026-12-03T20:00:00Z")
        self._answer(200, obj)

    def do_GET(self):
        request = self._record()
        if request["path"] in self.server.errors:
            return self._answer(*self.server.errors[request["path"]])
        if request["path"] in self.server.objects:
            return self._answer(200, self.server.objects[request["path"]])
        self._answer(404, status_body(404, "NotFound", "the server could not find the "
                                                       "requested resource"))


def status_body(code, reason, message, causes=None):
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if causes:
        body["details"] = {"causes": causes}
    return body


@pytest.fixture
def api(tmp_path, monkeypatch):
    server = FakeApi()
    server.thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: me, user: {{token: secret-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: me, namespace: team-a}}}}]
current-context: fake
""")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield server
    server.shutdown()
    server.server_close()


def objects(*sets):
    return [obj for _, obj in render_values(sets=list(sets))]


PATHS = [
    "/api/v1/namespaces/team-a/serviceaccounts/jcl-k8s",
    "/api/v1/namespaces/team-a/configmaps/jcl-pretrain-config",
    "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/jcl-pretrain",
    "/apis/monitoring.coreos.com/v1/namespaces/team-a/podmonitors/jcl-pretrain",
    "/api/v1/namespaces/team-a/configmaps/jcl-lincls-config",
    "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/jcl-lincls",
    "/apis/monitoring.coreos.com/v1/namespaces/team-a/podmonitors/jcl-lincls",
    "/apis/monitoring.coreos.com/v1/namespaces/team-a/prometheusrules/jcl-training",
    "/api/v1/namespaces/team-a/configmaps/jcl-dashboard",
]


def test_submit_server_side_applies_every_object(api):
    lines = list(submit(Cluster.connect(), objects()))
    assert [r["path"] for r in api.requests] == PATHS
    for request in api.requests:
        assert request["method"] == "PATCH"
        assert request["content_type"] == "application/apply-patch+yaml"
        assert request["query"]["fieldManager"] == ["jcl-k8s"]
        assert request["query"]["fieldValidation"] == ["Strict"]
        assert "force" not in request["query"] and "dryRun" not in request["query"]
        assert request["authorization"] == "Bearer secret-token"
        body = json.loads(request["body"])
        assert body["metadata"]["namespace"] == "team-a"
    job = json.loads(api.requests[2]["body"])
    assert job["kind"] == "PyTorchJob" and job["spec"]["nprocPerNode"] == "4"
    assert lines[2] == "pytorchjob/jcl-pretrain applied (resourceVersion 42)"


def test_submit_dry_run_and_force(api):
    lines = list(submit(Cluster.connect(namespace="other"), objects(), dry_run=True, force=True))
    assert all(r["query"]["dryRun"] == ["All"] for r in api.requests)
    assert all(r["query"]["force"] == ["true"] for r in api.requests)
    assert api.requests[0]["path"] == "/api/v1/namespaces/other/serviceaccounts/jcl-k8s"
    assert lines[0] == "serviceaccount/jcl-k8s applied (server dry run)"


def test_values_namespace_wins(api):
    list(submit(Cluster.connect(), objects("namespace=ml")))
    assert api.requests[0]["path"] == "/api/v1/namespaces/ml/serviceaccounts/jcl-k8s"


JOB = "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/jcl-pretrain"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (403, status_body(403, "Forbidden", 'pytorchjobs.kubeflow.org "jcl-pretrain" is '
                          'forbidden: User "me" cannot patch resource "pytorchjobs"'),
         "pytorchjob/jcl-pretrain: forbidden (HTTP 403): pytorchjobs.kubeflow.org "
         "\"jcl-pretrain\" is forbidden: User \"me\" cannot patch resource \"pytorchjobs\"; "
         "ask for RBAC permission"),
        (404, status_body(404, "NotFound", "the server could not find the requested resource"),
         "pytorchjob/jcl-pretrain: not found (HTTP 404): the server could not find the requested"
         " resource; is the Kubeflow training operator (v1) installed?"),
        (409, status_body(409, "Conflict", 'Apply failed with 1 conflict: conflict with '
                          '"kubectl-edit" using kubeflow.org/v1: .spec.runPolicy.backoffLimit'),
         "pytorchjob/jcl-pretrain: conflict (HTTP 409): Apply failed with 1 conflict: conflict "
         "with \"kubectl-edit\" using kubeflow.org/v1: .spec.runPolicy.backoffLimit; another "
         "field manager owns these fields: rerun with --force-conflicts"),
        (422, status_body(422, "Invalid", 'PyTorchJob.kubeflow.org "jcl-pretrain" is invalid',
                          [{"reason": "FieldValueInvalid", "field": "spec.nprocPerNode",
                            "message": "Invalid value: 0"}]),
         "pytorchjob/jcl-pretrain: invalid (HTTP 422): PyTorchJob.kubeflow.org \"jcl-pretrain\" "
         "is invalid (spec.nprocPerNode: Invalid value: 0)"),
    ],
)
def test_api_errors_become_one_clear_line(api, status, body, expected):
    api.errors[JOB] = (status, body)
    with pytest.raises(ClusterError) as error:
        list(submit(Cluster.connect(), objects()))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_cli_prints_the_error_as_one_line_and_exits_2(api, capsys):
    api.errors[JOB] = (403, status_body(403, "Forbidden", "no"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["submit", "--set", "lincls.enabled=false"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "jcl-k8s submit: error: pytorchjob/jcl-pretrain: forbidden (HTTP 403): no; ask for RBAC "
        "permission to patch this kind in this namespace"
    ]
    assert out.splitlines() == ["serviceaccount/jcl-k8s applied (resourceVersion 42)",
                                "configmap/jcl-pretrain-config applied (resourceVersion 42)"]


def test_unreachable_server_is_one_line(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("""
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
""")
    from kubernetes import client

    cluster = Cluster.connect(str(kubeconfig))
    configuration = cluster.api_client.configuration
    configuration.retries = 0
    cluster.api_client = client.ApiClient(configuration)
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server"):
        list(submit(cluster, objects()[:1]))


def write_run(root):
    """A run folder as the trainer leaves it: two committed checkpoints, one torn, a log."""
    for step, commit in ((6, True), (12, True), (18, False)):
        folder = root / "checkpoints" / f"step-{step:09d}"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x")
        if commit:
            (folder / "COMMIT").write_text("{}")
    (root / "metrics.jsonl").write_text(
        json.dumps({"global_step": 10, "epoch": 1, "loss": 5.5}) + "\n"
        + json.dumps({"global_step": 12, "epoch": 1, "loss": 5.25}) + "\n"
    )


def test_status_shows_conditions_replicas_pods_checkpoint_and_step(api, tmp_path):
    run = tmp_path / "run"
    write_run(run)
    api.objects[JOB] = {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": "jcl-pretrain", "namespace": "team-a",
                     "annotations": {"jcl-k8s/output-url": str(run)}},
        "status": {
            "conditions": [
                {"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
                 "message": "PyTorchJob jcl-pretrain is created.",
                 "lastTransitionTime": "2026-12-03T20:00:00Z"},
                {"type": "Running", "status": "True", "reason": "PyTorchJobRunning",
                 "message": "PyTorchJob team-a/jcl-pretrain is running.",
                 "lastTransitionTime": "2026-12-03T20:01:00Z"},
            ],
            "replicaStatuses": {"Worker": {"active": 2, "selector": "x"}},
        },
    }
    api.objects["/api/v1/namespaces/team-a/pods"] = {
        "kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": [
            {"metadata": {"name": f"jcl-pretrain-worker-{i}"},
             "status": {"phase": "Running", "containerStatuses": [
                 {"name": "pytorch", "image": "i", "imageID": "", "ready": True,
                  "restartCount": i,
                  "lastState": {"terminated": {"exitCode": 143, "reason": "Error"}} if i else {}},
             ]}}
            for i in (1, 0)
        ],
    }
    lines = list(job_status(Cluster.connect(), "jcl-pretrain"))
    pods_request = api.requests[-1]
    assert pods_request["query"]["labelSelector"] == ["training.kubeflow.org/job-name=jcl-pretrain"]
    assert lines == [
        "pytorchjob/jcl-pretrain (namespace team-a)",
        "conditions:",
        "  Created=True  PyTorchJobCreated  2026-12-03T20:00:00Z  PyTorchJob jcl-pretrain is "
        "created.",
        "  Running=True  PyTorchJobRunning  2026-12-03T20:01:00Z  PyTorchJob team-a/jcl-pretrain "
        "is running.",
        "replicas Worker: active 2, succeeded 0, failed 0",
        "  pod jcl-pretrain-worker-0: Running, restarts 0",
        "  pod jcl-pretrain-worker-1: Running, restarts 1, last exit 143 (Error)",
        f"run {run}:",
        f"  newest committed checkpoint: {run}/checkpoints/step-000000012",
        "  last logged step: 12 (epoch 2, loss 5.2500)",
        "  finished: no",
    ]


def test_status_of_a_missing_job(api):
    with pytest.raises(ClusterError, match="pytorchjob/nope in team-a: not found .HTTP 404."):
        list(job_status(Cluster.connect(), "nope"))
