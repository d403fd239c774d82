"""Checks Vigil's hand-written protos against the official ones, declaration by declaration.

Compiles proto/ with grpc_tools.protoc, then requires every message, field, enum value,
service and method it declares to exist in the official Python packages under the same full
name: tensorflow-serving-api (tensorflow_serving.*), TensorFlow (tensorflow.core.*) and
tritonclient (package `inference`). A field must match in number, type, message/enum type,
cardinality, packing, presence, oneof and JSON name; a method in request/response types and
streaming. Upstream declarations we leave out are fine: protobuf skips unknown fields.
Vigil's own APIs (package `vigil.*`) have no upstream and are skipped.

Usage: check_proto_wire_compat.py [DESCRIPTOR_SET ...]
Descriptor sets given as arguments (e.g. the one shared/proto's build embeds) are checked
as well as the one compiled here.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: E402
from google.protobuf import wrappers_pb2  # noqa: E402,F401  (BatchingParameters uses it)

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"

# Importing these registers the official descriptors in the default pool.
OFFICIAL_MODULES = [
    "tensorflow.core.framework.tensor_pb2",
    "tensorflow.core.framework.tensor_shape_pb2",
    "tensorflow.core.framework.types_pb2",
    "tensorflow.core.protobuf.error_codes_pb2",
    "tensorflow.core.protobuf.meta_graph_pb2",
    "tensorflow_serving.apis.classification_pb2",
    "tensorflow_serving.apis.get_model_metadata_pb2",
    "tensorflow_serving.apis.get_model_status_pb2",
    "tensorflow_serving.apis.inference_pb2",
    "tensorflow_serving.apis.model_management_pb2",
    "tensorflow_serving.apis.model_pb2",
    "tensorflow_serving.apis.model_service_pb2",
    "tensorflow_serving.apis.predict_pb2",
    "tensorflow_serving.apis.prediction_log_pb2",
    "tensorflow_serving.apis.prediction_service_pb2",
    "tensorflow_serving.apis.regression_pb2",
    "tensorflow_serving.apis.status_pb2",
    "tensorflow_serving.config.file_system_storage_path_source_pb2",
    "tensorflow_serving.config.model_server_config_pb2",
]
# tritonclient renamed its module; either one defines package `inference`.
TRITON_MODULES = ["tritonclient.grpc.service_pb2", "tritonclient.grpc.grpc_service_pb2"]

# tensorflow-serving-api does not ship Python modules for these TF Serving files, so
# their upstream declarations (tensorflow_serving/config/monitoring_config.proto,
# tensorflow_serving/config/ssl_config.proto and
# tensorflow_serving/servables/tensorflow/session_bundle_config.proto in the TF Serving
# repository) are restated here as (field, number, type, repeated, message type) and
# registered as if published. Only the fields Vigil declares are listed. A file the
# installed packages do publish is taken from them instead (see load_official).
F = descriptor_pb2.FieldDescriptorProto
UNPUBLISHED_UPSTREAM = {
    "tensorflow_serving/config/monitoring_config.proto": {
        "PrometheusConfig": [
            ("enable", 1, F.TYPE_BOOL, False, None),
            ("path", 2, F.TYPE_STRING, False, None),
        ],
        "MonitoringConfig": [
            ("prometheus_config", 1, F.TYPE_MESSAGE, False, ".tensorflow.serving.PrometheusConfig"),
        ],
    },
    "tensorflow_serving/config/ssl_config.proto": {
        "SSLConfig": [
            ("server_key", 1, F.TYPE_STRING, False, None),
            ("server_cert", 2, F.TYPE_STRING, False, None),
            ("custom_ca", 3, F.TYPE_STRING, False, None),
            ("client_verify", 4, F.TYPE_BOOL, False, None),
        ],
    },
    "tensorflow_serving/servables/tensorflow/session_bundle_config.proto": {
        "BatchingParameters": [
            ("max_batch_size", 1, F.TYPE_MESSAGE, False, ".google.protobuf.Int64Value"),
            ("batch_timeout_micros", 2, F.TYPE_MESSAGE, False, ".google.protobuf.Int64Value"),
            ("max_enqueued_batches", 3, F.TYPE_MESSAGE, False, ".google.protobuf.Int64Value"),
            ("num_batch_threads", 4, F.TYPE_MESSAGE, False, ".google.protobuf.Int64Value"),
            ("thread_pool_name", 5, F.TYPE_MESSAGE, False, ".google.protobuf.StringValue"),
            ("allowed_batch_sizes", 6, F.TYPE_INT64, True, None),
            ("pad_variable_length_inputs", 7, F.TYPE_BOOL, False, None),
        ],
    },
}

# Where our file path deliberately differs from the file upstream defines a type in.
# TF Serving imports tensorflow/core/protobuf/error_codes.proto, which upstream only
# re-exports (import public) from TSL's file; we declare the enum at the imported path.
FILE_EXCEPTIONS = {"tensorflow.error.Code": "tensorflow/core/protobuf/error_codes.proto"}

TYPE_NAMES = {v: k for k, v in F.Type.items()}


def load_official():
    for name in OFFICIAL_MODULES:
        importlib.import_module(name)
    for name in TRITON_MODULES:
        try:
            importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise ImportError(f"none of {TRITON_MODULES} imports; is tritonclient[grpc] installed?")
    pool = descriptor_pool.Default()
    for file_name, messages in UNPUBLISHED_UPSTREAM.items():
        try:
            pool.FindFileByName(file_name)
            continue  # published after all: the official declaration is the reference
        except KeyError:
            pass
        proto = descriptor_pb2.FileDescriptorProto(
            name=file_name, package="tensorflow.serving", syntax="proto3",
            dependency=["google/protobuf/wrappers.proto"])
        for message_name, fields in messages.items():
            message = proto.message_type.add(name=message_name)
            for name, number, type_, repeated, type_name in fields:
                field = message.field.add(
                    name=name, number=number, type=type_,
                    label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
                if type_name:
                    field.type_name = type_name
        pool.Add(proto)
    return pool


def compile_ours(out_dir):
    """Our proto/ tree as a descriptor set, compiled by grpc_tools' bundled protoc.

    Runs in a child process: grpc_tools' protoc crashes when TensorFlow's own protobuf
    library is already loaded into this one.
    """
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    out = Path(out_dir) / "vigil.desc"
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
            "--include_imports", f"--descriptor_set_out={out}", *files]
    if subprocess.run(args, check=False).returncode != 0:
        raise RuntimeError("grpc_tools.protoc failed to compile proto/ (see above)")
    return out


class Checker:
    def __init__(self, official):
        self.official = official
        self.problems = []
        self.checked = {"files": 0, "messages": 0, "fields": 0, "enum values": 0,
                        "services": 0, "methods": 0}

    def problem(self, text):
        self.problems.append(text)

    def check_set(self, path):
        descriptors = descriptor_pb2.FileDescriptorSet()
        descriptors.ParseFromString(Path(path).read_bytes())
        ours = descriptor_pool.DescriptorPool()
        for file in descriptors.file:
            ours.Add(file)
        for file in descriptors.file:
            # Well-known types, and Vigil's own APIs (package vigil.*), have no upstream.
            if file.name.startswith("google/protobuf/") or file.package.startswith("vigil."):
                continue
            self.checked["files"] += 1
            fd = ours.FindFileByName(file.name)
            for message in fd.message_types_by_name.values():
                self.check_file_location(message.full_name, file.name, self.find_message)
                self.check_message(message)
            for enum in fd.enum_types_by_name.values():
                self.check_file_location(enum.full_name, file.name, self.find_enum)
                self.check_enum(enum)
            for service in fd.services_by_name.values():
                self.check_service(service)

    def find_message(self, name):
        try:
            return self.official.FindMessageTypeByName(name)
        except KeyError:
            return None

    def find_enum(self, name):
        try:
            return self.official.FindEnumTypeByName(name)
        except KeyError:
            return None

    def check_file_location(self, full_name, our_file, find):
        # The inference package's file name is Triton's/KServe's choice; only TF's layout
        # is kept so that imports read like upstream's.
        if not full_name.startswith("tensorflow"):
            return
        official = find(full_name)
        if official is None:
            return  # reported by the content check
        expected = FILE_EXCEPTIONS.get(full_name, official.file.name)
        if our_file != expected:
            self.problem(f"{full_name}: declared in {our_file}; upstream in {expected}")

    def check_message(self, ours):
        official = self.find_message(ours.full_name)
        if official is None:
            self.problem(f"message {ours.full_name} does not exist upstream")
            return
        self.checked["messages"] += 1
        if ours.GetOptions().map_entry != official.GetOptions().map_entry:
            self.problem(f"{ours.full_name}: map entry on one side only")
        self.check_members("field", ours.fields, official.fields_by_name, describe)
        for nested in ours.nested_types:
            self.check_message(nested)
        for enum in ours.enum_types:
            self.check_enum(enum)

    def check_enum(self, ours):
        official = self.find_enum(ours.full_name)
        if official is None:
            self.problem(f"enum {ours.full_name} does not exist upstream")
            return
        for value in ours.values:
            self.checked["enum values"] += 1
            other = official.values_by_name.get(value.name)
            if other is None:
                self.problem(f"enum value {ours.full_name}.{value.name} does not exist upstream")
            elif other.number != value.number:
                self.problem(f"enum value {ours.full_name}.{value.name}: ours {value.number}, "
                             f"upstream {other.number}")

    def check_service(self, ours):
        try:
            official = self.official.FindServiceByName(ours.full_name)
        except KeyError:
            self.problem(f"service {ours.full_name} does not exist upstream")
            return
        self.checked["services"] += 1
        self.check_members("method", ours.methods, official.methods_by_name, describe_method)

    def check_members(self, kind, ours, upstream, describe_member):
        """Each of our fields or methods exists upstream by name and is described alike."""
        for member in ours:
            self.checked[kind + "s"] += 1
            other = upstream.get(member.name)
            if other is None:
                self.problem(f"{kind} {member.full_name} does not exist upstream")
                continue
            ours_desc, other_desc = describe_member(member), describe_member(other)
            if ours_desc != other_desc:
                diff = ", ".join(f"{k}: ours {ours_desc[k]!r}, upstream {other_desc[k]!r}"
                                 for k in ours_desc if ours_desc[k] != other_desc[k])
                self.problem(f"{kind} {member.full_name}: {diff}")


def describe_method(method):
    """A method's request and response types and streaming."""
    return {
        "input": method.input_type.full_name,
        "output": method.output_type.full_name,
        "client streaming": method.client_streaming,
        "server streaming": method.server_streaming,
    }


def describe(field):
    """Everything about a field that shapes its encoding or JSON form."""
    referenced = field.message_type or field.enum_type
    oneof = field.containing_oneof
    return {
        "number": field.number,
        "type": TYPE_NAMES.get(field.type, field.type),
        "type_name": referenced.full_name if referenced else "",
        "repeated": field.is_repeated,
        "packed": field.is_packed,
        "presence": field.has_presence,
        "oneof": oneof.name if oneof is not None else "",
        "json_name": field.json_name,
    }


def main(extra_sets):
    if importlib.util.find_spec("grpc_tools") is None:
        print("wire compatibility: grpcio-tools is not installed "
              "(pip install -r tests/compat/requirements.txt)", file=sys.stderr)
        return 2
    try:
        official = load_official()
    except ImportError as error:
        print(f"wire compatibility: cannot load the official packages: {error}", file=sys.stderr)
        return 2
    checker = Checker(official)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [("proto/ (compiled by grpc_tools.protoc)", compile_ours(tmp))]
        sets += [(str(path), path) for path in extra_sets]
        for label, path in sets:
            before = len(checker.problems)
            checker.checked = dict.fromkeys(checker.checked, 0)
            checker.check_set(path)
            summary = ", ".join(f"{n} {what}" for what, n in checker.checked.items())
            print(f"{label}: checked {summary}; "
                  f"{len(checker.problems) - before} mismatch(es)")
    if checker.problems:
        print(f"wire compatibility: FAILED, {len(checker.problems)} mismatch(es) "
              "with the official packages:")
        for problem in checker.problems:
            print("  -", problem)
        return 1
    print("wire compatibility: ok, every declaration matches the official packages")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
