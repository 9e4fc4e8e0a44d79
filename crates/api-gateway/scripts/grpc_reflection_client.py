#!/usr/bin/env python3
"""A gRPC client that is not ours: Python grpcio, with no generated code and no .proto.

It discovers the gateway's services through server reflection, builds the message
classes from the descriptors the server sends, and calls SessionService. Exit status 0
when every step worked.

Usage (against a running gateway, e.g. `cargo xtask up`):
    pip install grpcio grpcio-reflection protobuf
    STREAMSPACE_TOKEN=... python3 grpc_reflection_client.py 127.0.0.1:9090 [cluster]

With a cluster name the session is created for that cluster (an offline agent of it
will do); without one an online agent must exist.
"""

import os
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SESSION_SERVICE = "streamspace.api.v1.SessionService"


def reflect(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(request):
        return next(iter(stub.ServerReflectionInfo(iter([request]))))

    services = [
        s.name
        for s in ask(reflection_pb2.ServerReflectionRequest(list_services="")).list_services_response.service
    ]
    print("services:", ", ".join(sorted(services)))
    if SESSION_SERVICE not in services:
        sys.exit(f"{SESSION_SERVICE} is not served")
    answer = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SESSION_SERVICE))
    pool = descriptor_pool.DescriptorPool()
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in answer.file_descriptor_response.file_descriptor_proto]
    # Add dependencies before dependants.
    added = set()
    while len(added) < len(files):
        progress = False
        for f in files:
            if f.name not in added and all(d in added for d in f.dependency):
                pool.Add(f)
                added.add(f.name)
                progress = True
        if not progress:
            sys.exit("reflection returned descriptors with unresolved dependencies")
    return pool.FindServiceByName(SESSION_SERVICE)


def unary(channel, service, method_name, token, **fields):
    method = service.methods_by_name[method_name]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return call(request_cls(**fields), metadata=[("authorization", f"Bearer {token}")])


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9090"
    cluster = sys.argv[2] if len(sys.argv) > 2 else ""
    token = os.environ.get("STREAMSPACE_TOKEN")
    if not token:
        sys.exit("set STREAMSPACE_TOKEN to a user token")
    with grpc.insecure_channel(target) as channel:
        service = reflect(channel)
        print("methods:", ", ".join(m.name for m in service.methods))
        created = unary(channel, service, "CreateSession", token, template="firefox-browser", cluster=cluster)
        print(f"CreateSession -> id={created.id} state={created.state} agent={created.agent_id} command={created.command_id}")
        got = unary(channel, service, "GetSession", token, id=created.id)
        print(f"GetSession -> state={got.state}")
        listed = unary(channel, service, "ListSessions", token)
        if created.id not in [s.id for s in listed.sessions]:
            sys.exit("the created session is not listed")
        print(f"ListSessions -> {len(listed.sessions)} session(s)")
        stopped = unary(channel, service, "DeleteSession", token, id=created.id)
        print(f"DeleteSession -> state={stopped.state}")
        try:
            unary(channel, service, "GetSession", token, id="no-such-session")
            sys.exit("expected NOT_FOUND")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            print(f"GetSession(unknown) -> {e.code().name}: {e.details()}")
    print("ok")


if __name__ == "__main__":
    main()
