"""Arrow Flight SQL for duckfleet: a gRPC front end in the gateway process, beside HTTP.

Modules, each owning one thing: codec (the Flight SQL protobuf messages), metadata (catalog
commands' schemas and answers), statements (stateless prepared-statement handles and their
parameters), auth (tokens on gRPC calls), status (engine errors as gRPC statuses), bridge
(gRPC threads to the gateway's event loop), service (queries through the run API, on the
loop), server (the RPC handlers; started by gateway/app.py).
"""
