"""The official clients against the real model-server process.

Starts `model-server` (the binary given as argv[1]) on free loopback ports serving the
TF-exported autoencoder fixture, then calls it the way users do:
- tensorflow-serving-api: PredictionService.Predict (tf.make_tensor_proto input, as in TF
  Serving's own examples), GetModelMetadata, ModelService.GetModelStatus;
- tritonclient[grpc]: server/model readiness, model metadata and infer (ModelInfer);
- tritonclient[http]: the same over KServe v2's HTTP routes, with JSON and with binary
  tensor data, and an error's message and status;
- TF Serving's metric names at its monitoring path (`--monitoring_config_file`), counting
  those calls as a TF Serving dashboard would;
- tensorflow-serving-api again over TLS and mutual TLS configured by TF Serving's own
  --ssl_config_file (certificates made with the openssl command line), with management
  calls refused without the bearer token.
Answers are compared with TensorFlow's golden outputs committed beside the fixture.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "savedmodels", "autoencoder")


def start_server(binary, base, extra=()):
    process = subprocess.Popen(
        [binary, "--port=0", "--bind_address=127.0.0.1", "--model_name=autoencoder",
         f"--model_base_path={base}", "--enable_grpc_healthcheck_service", *extra],
        stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"Running gRPC ModelServer at ([\d.]+:\d+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"model-server did not report its port: {line!r}")
    return process, match.group(1)


def rest_address(process):
    """The REST address the server prints after its gRPC one (`--rest_api_address=...:0`)."""
    line = process.stdout.readline()
    match = re.search(r"Exporting HTTP/REST API at ([\d.]+:\d+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"model-server did not report its REST address: {line!r}")
    return match.group(1)


def sample(text, name, labels):
    """The value of the Prometheus sample `name` with exactly these labels, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', series[len(name):]))
        if found == labels:
            return float(value)
    return None


def main(binary):
    golden = json.load(open(os.path.join(FIXTURE, "golden.json")))
    cases = [(np.array(c["inputs"]["sensors"]["values"], np.float32).reshape(c["inputs"]["sensors"]["shape"]),
              np.array(c["outputs"]["output_0"]["values"], np.float32).reshape(c["outputs"]["output_0"]["shape"]))
             for c in golden["cases"]]
    workdir = tempfile.mkdtemp()
    base = os.path.join(workdir, "autoencoder")
    shutil.copytree(os.path.join(FIXTURE, "1"), os.path.join(base, "1"))
    monitoring = os.path.join(workdir, "monitoring.config")
    with open(monitoring, "w") as f:
        f.write('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n')
    process, address = start_server(binary, base, ["--rest_api_address=127.0.0.1:0",
                                                   f"--monitoring_config_file={monitoring}"])
    rest = rest_address(process)
    try:
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=60)

        # tensorflow-serving-api: Predict, exactly as TF Serving's client examples do it.
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for index, (inputs, expected) in enumerate(cases):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "autoencoder"
            request.model_spec.signature_name = "serving_default"
            request.inputs["sensors"].CopyFrom(tf.make_tensor_proto(inputs))
            response = stub.Predict(request, timeout=30)
            got = tf.make_ndarray(response.outputs["output_0"])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"Predict case {index}")
            assert response.model_spec.version.value == 1, response.model_spec
        print(f"tensorflow-serving-api Predict: {len(cases)} cases match TensorFlow")

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = "autoencoder"
        request.metadata_field.append("signature_def")
        response = stub.GetModelMetadata(request, timeout=30)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        sensors = signatures.signature_def["serving_default"].inputs["sensors"]
        assert [d.size for d in sensors.tensor_shape.dim] == [-1, 18], sensors
        assert sensors.dtype == tf.float32.as_datatype_enum
        print("tensorflow-serving-api GetModelMetadata: serving_default sensors float32[-1,18]")

        status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "autoencoder"
        response = status_stub.GetModelStatus(request, timeout=30)
        states = [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state))
                  for s in response.model_version_status]
        assert states == [(1, "AVAILABLE")], states
        print(f"tensorflow-serving-api GetModelStatus: {states}")

        # An error through the official client: the code and the message naming the input.
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "autoencoder"
        request.inputs["sensors"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 17), np.float32)))
        try:
            stub.Predict(request, timeout=30)
            raise AssertionError("a [1,17] input must be refused")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            assert "sensors" in error.details() and "[-1,18]" in error.details(), error.details()
        print("tensorflow-serving-api error: INVALID_ARGUMENT naming the input and shape")

        # tritonclient[grpc]: KServe v2.
        client = triton.InferenceServerClient(url=address)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("autoencoder")
        metadata = client.get_model_metadata("autoencoder")
        assert metadata.inputs[0].name == "sensors" and metadata.inputs[0].datatype == "FP32", metadata
        for index, (inputs, expected) in enumerate(cases):
            infer_input = triton.InferInput("sensors", list(inputs.shape), "FP32")
            infer_input.set_data_from_numpy(inputs)
            result = client.infer("autoencoder", [infer_input],
                                  outputs=[triton.InferRequestedOutput("output_0")])
            np.testing.assert_allclose(result.as_numpy("output_0"), expected, rtol=1e-5, atol=1e-5,
                                       err_msg=f"tritonclient infer case {index}")
        print(f"tritonclient infer: {len(cases)} cases match TensorFlow")

        # tritonclient[http]: KServe v2 over HTTP, on the REST port.
        http_client = triton_http.InferenceServerClient(url=rest)
        assert http_client.is_server_live() and http_client.is_server_ready()
        assert http_client.is_model_ready("autoencoder") and not http_client.is_model_ready("no-such-model")
        http_metadata = http_client.get_model_metadata("autoencoder")
        assert http_metadata["inputs"] == [{"name": "sensors", "datatype": "FP32", "shape": [-1, 18]}], http_metadata
        assert "binary_tensor_data" in http_client.get_server_metadata()["extensions"]
        for binary in (False, True):
            for index, (inputs, expected) in enumerate(cases):
                infer_input = triton_http.InferInput("sensors", list(inputs.shape), "FP32")
                infer_input.set_data_from_numpy(inputs, binary_data=binary)
                requested = triton_http.InferRequestedOutput("output_0", binary_data=binary)
                result = http_client.infer("autoencoder", [infer_input], outputs=[requested])
                np.testing.assert_allclose(result.as_numpy("output_0"), expected, rtol=1e-5, atol=1e-5,
                                           err_msg=f"tritonclient.http infer case {index} binary={binary}")
        # No outputs named: tritonclient asks for every output as binary data.
        infer_input = triton_http.InferInput("sensors", list(cases[0][0].shape), "FP32")
        infer_input.set_data_from_numpy(cases[0][0])
        result = http_client.infer("autoencoder", [infer_input])
        np.testing.assert_allclose(result.as_numpy("output_0"), cases[0][1], rtol=1e-5, atol=1e-5)
        wrong = triton_http.InferInput("sensors", [1, 17], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 17), np.float32))
        try:
            http_client.infer("autoencoder", [wrong])
            raise AssertionError("a [1,17] input must be refused over HTTP")
        except InferenceServerException as error:
            assert error.status() == "400" and "sensors" in error.message(), (error.status(), error.message())
        print(f"tritonclient.http infer: {len(cases)} cases match TensorFlow, JSON and binary; "
              "errors come back with status 400 naming the input")

        # What a TF Serving dashboard queries, after the calls above.
        text = urllib.request.urlopen(f"http://{rest}/monitoring/prometheus/metrics", timeout=30).read().decode()
        count = ":tensorflow:serving:request_count"
        ok = sample(text, count, {"model_name": "autoencoder", "status": "OK"})
        # Predict, gRPC ModelInfer, and HTTP infer: JSON, binary, and once with no outputs named.
        answered = 4 * len(cases) + 1
        assert ok == answered, f"{count} OK: {ok}, expected {answered}"
        refused = sample(text, count, {"model_name": "autoencoder", "status": "INVALID_ARGUMENT"})
        assert refused == 2, f"{count} INVALID_ARGUMENT: {refused} (one over gRPC, one over HTTP)"
        latency = ":tensorflow:serving:request_latency_count"
        predicts = sample(text, latency, {"model_name": "autoencoder", "API": "Predict", "entrypoint": "GRPC"})
        assert predicts == len(cases), f"{latency} for Predict: {predicts}"
        print(f"TF Serving's metric names: {count} OK {ok:.0f}, INVALID_ARGUMENT {refused:.0f}; "
              f"{latency} Predict {predicts:.0f}")
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"model-server exited with {code} after SIGTERM (expected a clean drain)")
    print("model-server drained and exited cleanly on SIGTERM")


def make_pki(workdir):
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (CN=deployer),
    made with the openssl command line; returns the PEM file paths."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=workdir)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=vigil-test-ca", "-days", "2")
    for name, cn, ext in [("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                          ("client", "deployer", "extendedKeyUsage=clientAuth")]:
        with open(os.path.join(workdir, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: os.path.join(workdir, name) for name in
            ["ca.pem", "server.key", "server.pem", "client.key", "client.pem"]}


def ssl_config(pki, client_verify):
    """TF Serving's SSLConfig text proto, PEM contents inline, as tensorflow_model_server takes it."""
    def quoted(path):
        return '"' + open(path).read().replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return (f"server_key: {quoted(pki['server.key'])}\nserver_cert: {quoted(pki['server.pem'])}\n"
            f"custom_ca: {quoted(pki['ca.pem'])}\nclient_verify: {'true' if client_verify else 'false'}\n")


def predict_once(channel, inputs):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "autoencoder"
    request.inputs["sensors"].CopyFrom(tf.make_tensor_proto(inputs))
    return tf.make_ndarray(stub.Predict(request, timeout=30).outputs["output_0"])


def refused(call):
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    raise AssertionError("the call must fail")


def main_tls(binary):
    """tensorflow-serving-api over TLS and mutual TLS, configured with TF Serving's own
    --ssl_config_file, and a management call with and without the bearer token."""
    golden = json.load(open(os.path.join(FIXTURE, "golden.json")))
    case = golden["cases"][0]
    inputs = np.array(case["inputs"]["sensors"]["values"], np.float32).reshape(case["inputs"]["sensors"]["shape"])
    expected = np.array(case["outputs"]["output_0"]["values"], np.float32).reshape(case["outputs"]["output_0"]["shape"])
    workdir = tempfile.mkdtemp()
    base = os.path.join(workdir, "autoencoder")
    shutil.copytree(os.path.join(FIXTURE, "1"), os.path.join(base, "1"))
    pki = make_pki(workdir)
    ca = open(pki["ca.pem"], "rb").read()
    client_cert, client_key = open(pki["client.pem"], "rb").read(), open(pki["client.key"], "rb").read()
    token = os.path.join(workdir, "token")
    with open(token, "w") as f:
        f.write("s3cret-management-token\n")
    processes = []
    try:
        for client_verify in (False, True):
            config = os.path.join(workdir, f"ssl-{client_verify}.cfg")
            with open(config, "w") as f:
                f.write(ssl_config(pki, client_verify))
            process, address = start_server(binary, base, [f"--ssl_config_file={config}",
                                                           f"--management_token_file={token}"])
            processes.append(process)
            with_cert = grpc.ssl_channel_credentials(root_certificates=ca, private_key=client_key,
                                                     certificate_chain=client_cert)
            without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
            channel = grpc.secure_channel(address, with_cert if client_verify else without_cert)
            grpc.channel_ready_future(channel).result(timeout=60)
            np.testing.assert_allclose(predict_once(channel, inputs), expected, rtol=1e-5, atol=1e-5)
            # Plaintext to a TLS port gets nowhere.
            plain = grpc.insecure_channel(address)
            code = refused(lambda: predict_once(plain, inputs))
            assert code == grpc.StatusCode.UNAVAILABLE, code
            if client_verify:
                code = refused(lambda: predict_once(grpc.secure_channel(address, without_cert), inputs))
                assert code == grpc.StatusCode.UNAVAILABLE, code
            # Management needs the token; reads do not.
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            reload = model_management_pb2.ReloadConfigRequest()
            config_entry = reload.config.model_config_list.config.add()
            config_entry.name, config_entry.base_path, config_entry.model_platform = "autoencoder", base, "tensorflow"
            # Without a token: no credentials at all is UNAUTHENTICATED; with mutual TLS the
            # client's certificate (CN=deployer, not an allowed subject) is a credential, refused.
            code = refused(lambda: models.HandleReloadConfigRequest(reload, timeout=30))
            wanted = grpc.StatusCode.PERMISSION_DENIED if client_verify else grpc.StatusCode.UNAUTHENTICATED
            assert code == wanted, code
            code = refused(lambda: models.HandleReloadConfigRequest(
                reload, timeout=30, metadata=[("authorization", "Bearer wrong")]))
            assert code == grpc.StatusCode.PERMISSION_DENIED, code
            models.HandleReloadConfigRequest(reload, timeout=60,
                                             metadata=[("authorization", "Bearer s3cret-management-token")])
            kind = "mutual TLS (client_verify: true)" if client_verify else "TLS"
            print(f"tensorflow-serving-api over {kind} from --ssl_config_file: Predict matches TensorFlow; "
                  "plaintext refused; HandleReloadConfigRequest refused without the token, PERMISSION_DENIED with a wrong "
                  "one, OK with it")
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
    main_tls(sys.argv[1])
