"""gRPC server reflection, so grpcurl and buf curl work without local proto files.

connectrpc-grpcreflect describes services with the `protobuf` (protobuf-py) runtime, while
our generated code uses google.protobuf. The file descriptors are the same bytes in both,
so this module re-reads ours into protobuf-py descriptors.
"""

from __future__ import annotations

from connectrpc_grpcreflect import (
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from google.protobuf import descriptor_pb2, descriptor_pool
from protobuf._file_registry import create_file_registry
from protobuf.wkt.google.protobuf.descriptor_pb import FileDescriptorProto


def _file_proto(name: str) -> FileDescriptorProto:
    google_file = descriptor_pool.Default().FindFileByName(name)
    serialized = descriptor_pb2.FileDescriptorProto()
    google_file.CopyToProto(serialized)
    return FileDescriptorProto.from_binary(serialized.SerializeToString())


def reflection_apps(service_names: list[str], **options) -> list:
    """Build the v1 and v1alpha reflection applications describing the given services."""
    pool = descriptor_pool.Default()
    files = []
    for service_name in service_names:
        file_name = pool.FindServiceByName(service_name).file.name
        registry = create_file_registry(_file_proto(file_name), _file_proto)
        files.append(registry.file(file_name))
    return [
        ServerReflectionASGIApplication(ServerReflectionService(*files), **options),
        ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*files), **options),
    ]
