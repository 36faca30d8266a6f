"""Access policies of RPCs, read from the `functions.options.v1.policy` method option.

Every method of our contracts declares its policy next to its definition in proto/. Services
that come from elsewhere (gRPC health, server reflection) get theirs from EXTERNAL_POLICIES.
A method found in neither is denied.
"""

from __future__ import annotations

from functools import cache

from functions.options.v1 import options_pb2
from google.protobuf import descriptor_pool

AccessPolicy = options_pb2.AccessPolicy

PUBLIC = AccessPolicy(access=options_pb2.ACCESS_PUBLIC)

EXTERNAL_POLICIES: dict[str, AccessPolicy] = {
    # Probes and tools call these without a token, and they reveal nothing private.
    "grpc.health.v1.Health/Check": PUBLIC,
    "grpc.health.v1.Health/Watch": PUBLIC,
    "grpc.health.v1.Health/List": PUBLIC,
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
}


@cache
def policy_for(service_name: str, method_name: str) -> AccessPolicy | None:
    """Return the declared policy of a method, or None when it declares none."""
    key = f"{service_name}/{method_name}"
    if key in EXTERNAL_POLICIES:
        return EXTERNAL_POLICIES[key]
    try:
        method = descriptor_pool.Default().FindMethodByName(f"{service_name}.{method_name}")
    except KeyError:
        return None
    options = method.GetOptions()
    if not options.HasExtension(options_pb2.policy):
        return None
    policy = options.Extensions[options_pb2.policy]
    if policy.access == options_pb2.ACCESS_UNSPECIFIED:
        return None
    return policy
