"""Checks Vigil's hand-written protos against the official ones, field by field.

Every message, field, enum value, service and method declared in proto/ (read from the
descriptor set shared/proto's build compiled) must exist in the official Python packages
(tensorflow-serving-api, TensorFlow, tritonclient) under the same full name, with the same
field number, type, cardinality and message/enum type. Fields the official protos have and
ours leave out are fine (protobuf skips unknown fields); a mismatch is not.

Usage: check_proto_wire_compat.py DESCRIPTOR_SET_FILE
"""

import sys

from google.protobuf import descriptor_pb2, descriptor_pool

# Importing these registers the official descriptors in the default pool.
import tensorflow.core.framework.tensor_pb2  # noqa: F401
import tensorflow.core.protobuf.meta_graph_pb2  # noqa: F401
import tensorflow.core.protobuf.error_codes_pb2  # noqa: F401
from tensorflow_serving.apis import (  # noqa: F401
    get_model_metadata_pb2, get_model_status_pb2, model_management_pb2, model_service_pb2,
    prediction_log_pb2, prediction_service_pb2)
from tensorflow_serving.config import model_server_config_pb2  # noqa: F401
import tritonclient.grpc.service_pb2  # noqa: F401

# Files whose official Python modules are not published; checked by the Rust tests only.
UNPUBLISHED = {
    "tensorflow_serving/config/monitoring_config.proto",
    "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
}

pool = descriptor_pool.Default()
problems = []
checked = {"messages": 0, "fields": 0, "enum values": 0, "methods": 0}


def check_message(ours, prefix):
    name = f"{prefix}.{ours.name}"
    if ours.options.map_entry:
        return  # map entries are synthesized; the map field itself is checked
    try:
        official = pool.FindMessageTypeByName(name)
    except KeyError:
        problems.append(f"message {name} does not exist upstream")
        return
    checked["messages"] += 1
    by_name = {f.name: f for f in official.fields}
    for field in ours.field:
        other = by_name.get(field.name)
        checked["fields"] += 1
        if other is None:
            problems.append(f"{name}.{field.name} does not exist upstream")
            continue
        type_name = field.type_name.lstrip(".")
        other_type = (other.message_type or other.enum_type)
        other_type_name = other_type.full_name if other_type else ""
        ours_repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        if (field.number, field.type, type_name, ours_repeated) != (
                other.number, other.type, other_type_name, other.is_repeated):
            problems.append(
                f"{name}.{field.name}: ours number={field.number} type={field.type} {type_name} "
                f"repeated={ours_repeated}; upstream number={other.number} type={other.type} "
                f"{other_type_name} repeated={other.is_repeated}")
    for nested in ours.nested_type:
        check_message(nested, name)
    for enum in ours.enum_type:
        check_enum(enum, name)


def check_enum(ours, prefix):
    name = f"{prefix}.{ours.name}"
    try:
        official = pool.FindEnumTypeByName(name)
    except KeyError:
        problems.append(f"enum {name} does not exist upstream")
        return
    values = {v.name: v.number for v in official.values}
    for value in ours.value:
        checked["enum values"] += 1
        if values.get(value.name) != value.number:
            problems.append(f"{name}.{value.name} = {value.number}; upstream {values.get(value.name)}")


def main(path):
    descriptors = descriptor_pb2.FileDescriptorSet()
    with open(path, "rb") as f:
        descriptors.ParseFromString(f.read())
    for file in descriptors.file:
        if file.name.startswith("google/protobuf/") or file.name in UNPUBLISHED:
            continue
        for message in file.message_type:
            check_message(message, file.package)
        for enum in file.enum_type:
            check_enum(enum, file.package)
        for service in file.service:
            name = f"{file.package}.{service.name}"
            try:
                official = pool.FindServiceByName(name)
            except KeyError:
                problems.append(f"service {name} does not exist upstream")
                continue
            methods = {m.name: m for m in official.methods}
            for method in service.method:
                checked["methods"] += 1
                other = methods.get(method.name)
                if other is None:
                    problems.append(f"{name}.{method.name} does not exist upstream")
                elif (method.input_type.lstrip("."), method.output_type.lstrip(".")) != (
                        other.input_type.full_name, other.output_type.full_name):
                    problems.append(f"{name}.{method.name}: request/response types differ")
    summary = ", ".join(f"{n} {what}" for what, n in checked.items())
    if problems:
        print(f"wire compatibility: {len(problems)} mismatch(es) ({summary} checked):")
        for problem in problems:
            print("  -", problem)
        return 1
    print(f"wire compatibility: ok ({summary} checked against the official packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
