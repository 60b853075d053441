"""A gRPC client that is not ember's: Python grpcio discovers the coordinator's API through server
reflection (v1alpha) and calls FleetService.ListServices with messages built from the reflected descriptors.

Usage: reflection_client.py HOST:PORT CA CERT KEY   (prints JSON: the service names and the response)
"""
import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

addr, ca, cert, key = sys.argv[1:5]
with open(ca, "rb") as f_ca, open(key, "rb") as f_key, open(cert, "rb") as f_cert:
    creds = grpc.ssl_channel_credentials(f_ca.read(), f_key.read(), f_cert.read())
channel = grpc.secure_channel(addr, creds)
reflection = ProtoReflectionDescriptorDatabase(channel)
services = list(reflection.get_services())
pool = DescriptorPool(reflection)
method = pool.FindServiceByName("ember.v1.FleetService").FindMethodByName("ListServices")
request_class = message_factory.GetMessageClass(method.input_type)
response_class = message_factory.GetMessageClass(method.output_type)
call = channel.unary_unary(
    "/ember.v1.FleetService/ListServices",
    request_serializer=request_class.SerializeToString,
    response_deserializer=response_class.FromString,
)
response = call(request_class(), timeout=10)
print(json.dumps({"services": services, "response": json_format.MessageToDict(response)}))
