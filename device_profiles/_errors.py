"""The root of fleetlearn's exception tree.

It lives in the lowest layer (``device_profiles`` imports nothing of the project) so
that every package can derive from it. The whole tree, by package::

    FleetlearnError                      device_profiles
    ├── ConfigError                      device_profiles  (bad configuration, from any source)
    │   ├── BrokerRefused                broker_bridge    (the broker refuses us for good)
    │   └── EnrolmentError               broker_bridge    (an enrolment file that cannot be used)
    ├── ProfileError                     device_profiles  (bad or missing device profile)
    ├── WireError                        broker_bridge    (untrusted bytes that do not decode)
    │   ├── EnvelopeError                broker_bridge    (header: magic, version, lengths)
    │   ├── ChunkError                   broker_bridge    (reassembly limits, inconsistent chunks)
    │   ├── CodecError                   broker_bridge    (update body: spec, sizes, indices, NaN)
    │   ├── ProtocolError                broker_bridge    (a JSON body that breaks the protocol)
    │   ├── SignatureError               broker_bridge    (a malformed signature block)
    │   ├── BundleError                  broker_bridge    (an artifact bundle that does not unpack)
    │   └── SecAggRejected               broker_bridge    (a secure-aggregation message or share)
    ├── TransportError                   broker_bridge    (the broker and the network: outside us)
    │   └── BrokerUnavailable            broker_bridge
    ├── AgentError                       edge_runtime
    │   ├── TrainingBackendMissing       edge_runtime     (no usable ONNX Runtime backend)
    │   ├── ArtifactError                edge_runtime     (corrupt or mismatched artifacts)
    │   ├── DataError                    edge_runtime     (local data does not fit the model)
    │   ├── ModelVersionError            edge_runtime     (a global model that is not the task's)
    │   ├── HookError                    edge_runtime     (a hook returned something unusable)
    │   ├── IllegalTransition            edge_runtime     (the agent's state machine refused)
    │   └── StateError                   edge_runtime     (the agent's state dir cannot be used)
    │       ├── DiskFull                 edge_runtime
    │       ├── DeviceKeyError           edge_runtime     (unreadable, corrupt or exposed key)
    │       └── StateInUse               edge_runtime     (another agent holds the folder)
    └── AggregatorError                  cloud_aggregator
        ├── ModelBuildError              cloud_aggregator (unsupported ONNX graph)
        ├── UpdateRejected               cloud_aggregator (an update broke a rule)
        ├── SecAggAbandoned              cloud_aggregator (a secure round without a checked sum)
        ├── LedgerError                  cloud_aggregator (the training ledger cannot be used)
        │   └── LedgerMismatch           cloud_aggregator (an entry that does not verify)
        ├── PrivacyBudgetExhausted       cloud_aggregator (the next round would pass dp_epsilon)
        └── StoreError                   cloud_aggregator (the SQLite state cannot be used)
            ├── SchemaTooNew             cloud_aggregator (written by a newer fleetlearn)
            ├── CheckpointCorrupt        cloud_aggregator (a model file that fails its hash)
            └── StateDirInUse            cloud_aggregator (another aggregator holds the dir)

Every class in the tree is importable from ``fleetlearn`` (``fleetlearn.StoreError``)
and from its package's front door; ``tests/fleetlearn/test_public_api.py`` checks this tree against
the real subclasses, so a new error class must be added here.

Errors we cause (bad input, bad configuration) are kept apart from outside failures
(``TransportError``): a caller retries the second kind, never the first.
"""

from __future__ import annotations


class FleetlearnError(Exception):
    """Base of every error fleetlearn raises on purpose."""


class ConfigError(FleetlearnError, ValueError):
    """Configuration (TOML, environment, flags) that cannot be used as given."""


class ProfileError(FleetlearnError, ValueError):
    """A device profile that is malformed, incomplete or unknown."""
