"""The CustomResourceDefinitions of isthmus's configuration API, built from the proto descriptors.

The messages of ``api/protos/isthmus/api/v1alpha1`` are the single source: the generated Python
classes (``isthmus.api.v1alpha1.*_pb2``) read the objects, and this module turns the same
descriptors into the OpenAPI v3 schemas of the CRDs, so that what the API server accepts is what
``json_format.ParseDict`` parses. The mapping is proto3's JSON mapping:

* field names are the lowerCamelCase ``json_name``;
* ``string`` -> string, ``bool`` -> boolean, ``int32``/``uint32`` -> integer (int32), ``float``
  and ``double`` -> number; an enum -> a string, one of its value names;
* ``google.protobuf.Duration`` -> a string of seconds (``"1.5s"``, never negative),
  ``google.protobuf.Timestamp`` -> an RFC 3339 ``date-time`` string;
* a message -> an object of its fields; ``repeated`` -> an array (a map-list keyed by the fields
  ``list_map_keys`` names, so server-side apply merges items by key);
* the ``(isthmus.api.v1alpha1.schema)`` field options (options.proto) add bounds, patterns,
  lengths, string enums, formats and ``required``.

Kinds the JSON mapping gives no plain schema (64-bit integers are strings in proto3 JSON, bytes,
maps, oneofs, Any, Struct, wrappers) raise ``UnsupportedField``: add them here before using them.
No schema keeps unknown fields, so the API server prunes them, and rejects them where the client
asks for strict field validation (kubectl does by default).

Pure: no I/O. ``isthmus.api.generate`` (``make api``) writes the results to ``deploy/crds``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from isthmus.api.v1alpha1 import authorization_pb2, member_cluster_pb2, mesh_pb2, options_pb2

GROUP = "isthmus.io"
VERSION = "v1alpha1"
# proto3 JSON of a Duration: seconds with up to 9 fractional digits, then "s"; negative ones refused.
DURATION_PATTERN = r"^[0-9]+(\.[0-9]{1,9})?s$"

Json = dict[str, Any]

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

    _Schema = _ExtensionFieldDescriptor[descriptor_pb2.FieldOptions, options_pb2.Constraints]
_SCHEMA = cast("_Schema", options_pb2.schema)  # protoc's .pyi types extensions loosely


class UnsupportedField(TypeError):
    """A field whose JSON form this module does not map to a schema (yet)."""


def constraints(field: FieldDescriptor) -> options_pb2.Constraints:
    """The ``(isthmus.api.v1alpha1.schema)`` option of ``field`` (empty if none)."""
    return field.GetOptions().Extensions[_SCHEMA]


def descriptor(message: type[Message]) -> Descriptor:
    """The descriptor of a generated message class (the stubs' type is a union of implementations)."""
    return cast(Descriptor, message.DESCRIPTOR)


# Member cluster names: the pattern of MeshConfigSpec.Gateway.cluster, also the MemberCluster's name.
_GATEWAY_CLUSTER = descriptor(mesh_pb2.MeshConfigSpec.Gateway).fields_by_name["cluster"]
CLUSTER_NAME_PATTERN = constraints(_GATEWAY_CLUSTER).pattern
CLUSTER_NAME_MAX_LENGTH = constraints(_GATEWAY_CLUSTER).max_length

_SCALARS: dict[int, Json] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
}
_WELL_KNOWN: dict[str, Json] = {
    "google.protobuf.Duration": {"type": "string", "pattern": DURATION_PATTERN},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}


def _describe(schema: Json, text: str | None) -> Json:
    return {"description": text, **schema} if text else schema


def message_schema(message: Descriptor, docs: Mapping[str, str] = {}) -> Json:
    """The OpenAPI v3 schema of ``message`` in its proto3 JSON form; ``docs``: descriptions by
    full proto name (``comments``), optional."""
    properties: Json = {}
    required: list[str] = []
    for field in message.fields:
        if field.containing_oneof is not None and field.containing_oneof.name != f"_{field.name}":
            raise UnsupportedField(f"{field.full_name}: oneofs have no schema here")
        properties[field.json_name] = field_schema(field, docs)
        if constraints(field).required:
            required.append(field.json_name)
    schema: Json = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return _describe(schema, docs.get(message.full_name))


def field_schema(field: FieldDescriptor, docs: Mapping[str, str] = {}) -> Json:
    """The schema of one field's JSON value (an array of them if it is repeated)."""
    option = constraints(field)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        raise UnsupportedField(f"{field.full_name}: map fields have no schema here")
    item = _value_schema(field, docs)
    if option.pattern:
        item["pattern"] = option.pattern
    if option.format:
        item["format"] = option.format
    if option.enum:
        item["enum"] = list(option.enum)
    if option.HasField("min_length"):
        item["minLength"] = option.min_length
    if option.HasField("max_length"):
        item["maxLength"] = option.max_length
    if option.HasField("minimum"):
        item["minimum"] = option.minimum
    if option.HasField("maximum"):
        item["maximum"] = option.maximum
    description = docs.get(field.full_name)
    if field.enum_type is not None:
        description = _with_values(description, field.enum_type, docs)
    if not field.is_repeated:
        if option.list_map_keys or option.HasField("max_items"):
            raise UnsupportedField(f"{field.full_name}: list_map_keys and max_items are for repeated fields")
        return _describe(item, description)
    array: Json = {"type": "array", "items": item}
    if option.HasField("max_items"):
        array["maxItems"] = option.max_items
    if option.list_map_keys:
        if field.message_type is None:
            raise UnsupportedField(f"{field.full_name}: list_map_keys needs a repeated message field")
        keys = [field.message_type.fields_by_name[name] for name in option.list_map_keys]
        if not all(constraints(key).required for key in keys):
            raise UnsupportedField(f"{field.full_name}: list map keys must be required")
        array["x-kubernetes-list-type"] = "map"
        array["x-kubernetes-list-map-keys"] = [key.json_name for key in keys]
    else:
        array["x-kubernetes-list-type"] = "atomic"
    return _describe(array, description)


def _value_schema(field: FieldDescriptor, docs: Mapping[str, str]) -> Json:
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    if field.message_type is not None:
        well_known = _WELL_KNOWN.get(field.message_type.full_name)
        if well_known is not None:
            return dict(well_known)
        if field.message_type.full_name.startswith("google.protobuf."):
            raise UnsupportedField(f"{field.full_name}: {field.message_type.full_name} has no schema here")
        schema = message_schema(field.message_type, docs)
        schema.pop("description", None)  # the field's own comment describes it
        return schema
    scalar = _SCALARS.get(field.type)
    if scalar is None:
        raise UnsupportedField(f"{field.full_name}: proto type {field.type} has no plain JSON schema")
    return dict(scalar)


def _with_values(description: str | None, enum: EnumDescriptor, docs: Mapping[str, str]) -> str | None:
    named = [(v.name, docs.get(f"{enum.full_name}.{v.name}")) for v in enum.values]
    values = [f'"{name}": {text}' for name, text in named if text]
    if not values:
        return description
    return "\n".join([description or "", *values]).strip()


@dataclass(frozen=True, slots=True)
class PrinterColumn:
    name: str
    type: str  # integer, string, date, ...
    json_path: str
    description: str

    def json(self) -> Json:
        return {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }


@dataclass(frozen=True, slots=True)
class Kind:
    """One custom resource of the API: its names and the messages of its spec and status."""

    kind: str
    plural: str
    spec: Descriptor
    status: Descriptor | None = None  # with the status subresource
    columns: tuple[PrinterColumn, ...] = ()
    name_pattern: str = ""  # what metadata.name must match, beyond Kubernetes' own rules
    name_max_length: int = 0
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def proto(self) -> str:
        """The .proto file the messages come from, relative to api/protos."""
        return self.spec.file.name

    def api_version(self) -> str:
        return f"{GROUP}/{VERSION}"


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "When the object was created.")

MESH_CONFIG = Kind(
    kind="MeshConfig",
    plural="meshconfigs",
    spec=descriptor(mesh_pb2.MeshConfigSpec),
    status=descriptor(mesh_pb2.MeshConfigStatus),
    columns=(
        PrinterColumn("TrustDomain", "string", ".spec.trustDomain", "The mesh's SPIFFE trust domain."),
        PrinterColumn("Export", "string", ".spec.exportPolicy", "Which services join the mesh."),
        PrinterColumn(
            "Accepted",
            "string",
            '.status.conditions[?(@.type=="Accepted")].status',
            "Whether the spec is valid and in force.",
        ),
        AGE,
    ),
    description="The mesh-wide settings of isthmus, read from the home cluster; a set field overrides "
    "the `isthmus serve` flag of the same name.",
)
MEMBER_CLUSTER = Kind(
    kind="MemberCluster",
    plural="memberclusters",
    spec=descriptor(member_cluster_pb2.MemberClusterSpec),
    status=descriptor(member_cluster_pb2.MemberClusterStatus),
    columns=(
        PrinterColumn("Drain", "integer", ".spec.drain.weight", "The weight the spec asks for, in percent."),
        PrinterColumn("Weight", "integer", ".status.drain.weight", "The weight in force, in percent."),
        PrinterColumn("State", "string", ".status.drain.state", "Where the latest drain or undrain is."),
        AGE,
    ),
    name_pattern=CLUSTER_NAME_PATTERN,
    name_max_length=CLUSTER_NAME_MAX_LENGTH,
    description="One member cluster of the mesh, named after it: what an operator sets on it (a drain) "
    "and what isthmus reports back.",
)
AUTHORIZATION_POLICY = Kind(
    kind="AuthorizationPolicy",
    plural="authorizationpolicies",
    spec=descriptor(authorization_pb2.AuthorizationPolicySpec),
    columns=(
        PrinterColumn(
            "ServiceAccount", "string", ".spec.selector.serviceAccount", "The workloads it selects."
        ),
        AGE,
    ),
    description="Who may call the workloads of a service account, by SPIFFE identity "
    "(docs/authorization.md); read from every member cluster.",
)
KINDS = (MESH_CONFIG, MEMBER_CLUSTER, AUTHORIZATION_POLICY)


def crd(kind: Kind, docs: Mapping[str, str] = {}) -> Json:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) of ``kind``."""
    metadata: Json = {"type": "object"}
    if kind.name_pattern:
        name: Json = {"type": "string", "pattern": kind.name_pattern}
        if kind.name_max_length:
            name["maxLength"] = kind.name_max_length
        metadata["properties"] = {"name": name}
    properties: Json = {
        "apiVersion": {"type": "string", "description": "The API version: isthmus.io/v1alpha1."},
        "kind": {"type": "string", "description": f"The kind: {kind.kind}."},
        "metadata": metadata,
        "spec": message_schema(kind.spec, docs),
    }
    version: Json = {"name": VERSION, "served": True, "storage": True}
    if kind.status is not None:
        properties["status"] = message_schema(kind.status, docs)
        version["subresources"] = {"status": {}}
    version["schema"] = {
        "openAPIV3Schema": _describe({"type": "object", "properties": properties}, kind.description)
    }
    if kind.columns:
        version["additionalPrinterColumns"] = [column.json() for column in kind.columns]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "categories": ["isthmus"],
            },
            "versions": [version],
        },
    }


def comments(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """The leading comment of every message, field, enum and enum value of ``files`` (compiled with
    source info: ``protoc --include_source_info``), by full proto name, as one line each."""
    docs: dict[str, str] = {}
    for file in files:
        names = _names_by_path(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = " ".join(line.strip() for line in location.leading_comments.splitlines()).strip()
            if name is not None and text:
                docs[name] = text
    return docs


# Field numbers of FileDescriptorProto / DescriptorProto / EnumDescriptorProto in source paths.
_FILE_MESSAGE, _FILE_ENUM = 4, 5
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2


def _names_by_path(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    names: dict[tuple[int, ...], str] = {}

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        names[path] = f"{scope}.{e.name}"
        for i, value in enumerate(e.value):
            names[(*path, _ENUM_VALUE, i)] = f"{scope}.{e.name}.{value.name}"

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full = f"{scope}.{m.name}"
        names[path] = full
        for i, field in enumerate(m.field):
            names[(*path, _MESSAGE_FIELD, i)] = f"{full}.{field.name}"
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, _MESSAGE_NESTED, i), full)
        for i, nested_enum in enumerate(m.enum_type):
            enum(nested_enum, (*path, _MESSAGE_ENUM, i), full)

    for i, m in enumerate(file.message_type):
        message(m, (_FILE_MESSAGE, i), file.package)
    for i, e in enumerate(file.enum_type):
        enum(e, (_FILE_ENUM, i), file.package)
    return names
