"""kvfs.daemon.volume without a mount: what a volume says about itself."""

from __future__ import annotations

import pytest

from kvfs.config.parameters import POD_NAME_KEY, POD_NAMESPACE_KEY, parse_parameters
from kvfs.daemon.volume import empty_volume_warning

SP = {"clientid": "00000000-0000-0000-0000-0000000000a1", "clientsecret": "not-logged"}
PARAMS = {"keyvaultName": "kv1", "tenantID": "00000000-0000-0000-0000-0000000000b2", "objects": "array: []"}
TAIL = (
    ": spec.parameters.objects lists no objects (its array is empty), so the volume is empty"
    " (upstream mounts it empty too); add an entry per object to objects.array"
)


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"secretProviderClass": "app-secrets"}, 'SecretProviderClass "app-secrets" in namespace "shop"'),
        ({}, "the volume's parameters"),  # given inline (kvfs csi node --allow-inline-parameters)
    ],
)
def test_a_csi_volume_without_objects_names_its_class_and_namespace(extra: dict[str, str], where: str) -> None:
    params = {**PARAMS, POD_NAME_KEY: "web-0", POD_NAMESPACE_KEY: "shop", **extra}
    config = parse_parameters(params, SP, context="csi")
    assert config.objects == ()
    assert empty_volume_warning(config) == where + TAIL
