"""A locustfile for the over-limit test: greedy callers beside ordinary ones.

Greedy users make calls without pausing, from one uid each, so the server's rate limit throttles
them. A throttled reply (resource_exhausted) is what they expect, so it counts as a success under
the name "throttled". Any other error counts as a failure. The ordinary users of
loadtests/locustfile.py run beside them, unchanged, and must see no failure at all.
"""

from __future__ import annotations

import time

import grpc
from google.protobuf import json_format
from locust import constant

import loadtests.locustfile as base

GREEDY_PREFIX = "greedy "
THROTTLED = "throttled"


class ConnectJsonUser(base.ConnectJsonUser):
    """The ordinary Connect JSON user of the load test."""


class GrpcUser(base.GrpcUser):
    """The ordinary gRPC user of the load test."""


class GreedyConnectUser(base.ConnectJsonUser):
    """Makes the ordinary user's calls over Connect JSON without pausing."""

    fixed_count = 1
    wait_time = constant(0.01)

    def call(self, method: base.Method, request) -> None:
        headers = {"content-type": "application/json", "authorization": self.credential.authorization()}
        with self.client.post(
            method.path, data=json_format.MessageToJson(request, indent=None), headers=headers,
            name=GREEDY_PREFIX + method.path, catch_response=True,
        ) as response:
            if response.status_code == 200:
                response.success()
            elif response.status_code == 429 and response.json().get("code") == "resource_exhausted":
                response.success()
                self.environment.events.request.fire(
                    request_type="POST", name=THROTTLED, response_time=0, response_length=0, exception=None
                )
            else:
                response.failure(base.connect_error_text(response))


class GreedyGrpcUser(base.GrpcUser):
    """Makes the ordinary user's calls over native gRPC without pausing."""

    fixed_count = 1
    wait_time = constant(0.01)

    def call(self, method: base.Method, request) -> None:
        metadata = (("authorization", self.credential.authorization()),)
        error = None
        name = GREEDY_PREFIX + method.path

        start = time.perf_counter()
        try:
            self.stubs[method.path](request, metadata=metadata, timeout=base.CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as rpc_error:
            if rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                name = THROTTLED
            else:
                error = base.GrpcStatusError(rpc_error.code(), rpc_error.details() or "")
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=0, exception=error,
        )


