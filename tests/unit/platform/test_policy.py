"""Every RPC of our contracts declares an access policy next to its definition."""

from __future__ import annotations

import pytest
from functions.auth.v1 import auth_pb2
from functions.options.v1 import options_pb2
from functions.user.v1 import user_pb2
from google.protobuf import descriptor_pool

from app.platform.policy import policy_for

CONTRACT_FILES = [auth_pb2.DESCRIPTOR, user_pb2.DESCRIPTOR]
METHODS = [
    (service.full_name, method.name)
    for file in CONTRACT_FILES
    for service in file.services_by_name.values()
    for method in service.methods
]


@pytest.mark.parametrize(("service", "method"), METHODS)
def test_every_method_declares_policy(service: str, method: str) -> None:
    policy = policy_for(service, method)

    assert policy is not None
    assert policy.access != options_pb2.ACCESS_UNSPECIFIED


@pytest.mark.parametrize(("service", "method"), METHODS)
def test_role_policies_name_roles(service: str, method: str) -> None:
    policy = policy_for(service, method)

    if policy.access == options_pb2.ACCESS_ROLE:
        assert list(policy.roles)


@pytest.mark.parametrize(("service", "method"), METHODS)
def test_owner_field_exists_on_request(service: str, method: str) -> None:
    policy = policy_for(service, method)
    descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")

    if policy.access == options_pb2.ACCESS_SELF_OR_ADMIN:
        assert policy.owner_field in descriptor.input_type.fields_by_name


def test_unknown_method_has_no_policy() -> None:
    assert policy_for("functions.user.v1.UserService", "DropTables") is None
    assert policy_for("tests.Nothing", "Call") is None
