"""Values: Helm-style merging of files and --set, type inference, unknown keys with suggestions."""

import pytest

from jcl_k8s.k8s.values import (
    ValuesError,
    default_values,
    format_path,
    infer,
    load_values,
    parse_path,
    parse_set,
)


def write(tmp_path, text, name="values.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_pass_their_own_schema():
    assert load_values() == default_values()


def test_files_merge_in_order_maps_deeply_lists_replaced(tmp_path):
    first = write(tmp_path, """
pod:
  gpus: 8
  nodeSelector: {gpu: h100}
  tolerations: [{key: a, operator: Exists}, {key: b, operator: Exists}]
""", "one.yaml")
    second = write(tmp_path, """
pod:
  nodeSelector: {zone: west}
  tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]
pretrain:
  training:
    epochs: 100
""", "two.yaml")
    values = load_values([first, second])
    assert values["pod"]["gpus"] == 8  # kept from the first file
    assert values["pod"]["cpu"] == "32"  # kept from the defaults
    assert values["pod"]["nodeSelector"] == {"gpu": "h100", "zone": "west"}  # maps merge
    assert values["pod"]["tolerations"] == [
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}
    ]  # lists are replaced
    assert values["pretrain"]["training"]["epochs"] == 100
    assert values["pretrain"]["training"]["data"]["url"] == "s3://jcl-data/imagenet"


def test_set_paths_indices_and_inferred_types():
    values = load_values(sets=[
        "pod.gpus=2,pretrain.nodes.max=4",
        "pod.tolerations[0].key=spot",
        "pod.tolerations[0].operator=Exists",
        r"pod.nodeSelector.cloud\.google\.com/gke-accelerator=nvidia-h100",
        "pod.annotations.flag=true,pod.annotations.ratio=0.5,pod.annotations.none=null",
        "image.pullSecrets={regcred,other}",
        "pretrain.training.lr=0.1",
        "pretrain.training.jcl_lambda=4",
        "pretrain.training.jcl=false",
    ])
    assert values["pod"]["gpus"] == 2
    assert values["pretrain"]["nodes"]["max"] == 4
    assert values["pod"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert values["pod"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100"}
    assert values["pod"]["annotations"] == {"flag": True, "ratio": 0.5, "none": None}
    assert values["image"]["pullSecrets"] == ["regcred", "other"]
    assert values["pretrain"]["training"]["lr"] == 0.1
    assert values["pretrain"]["training"]["jcl_lambda"] == 4.0
    assert values["pretrain"]["training"]["jcl"] is False


def test_set_types_by_the_default_so_strings_stay_strings():
    # Helm would make these a float and an int; the default says they are strings.
    values = load_values(sets=["image.tag=1.2", "pod.cpu=16"])
    assert values["image"]["tag"] == "1.2"
    assert values["pod"]["cpu"] == "16"


def test_set_string_and_null():
    values = load_values(
        sets=["pretrain.training.epochs=null"], set_strings=["pod.annotations.n=42"]
    )
    assert values["pretrain"]["training"]["epochs"] is None
    assert values["pod"]["annotations"]["n"] == "42"


def test_set_overrides_files(tmp_path):
    path = write(tmp_path, "pod: {gpus: 8}\n")
    assert load_values([path], ["pod.gpus=1"])["pod"]["gpus"] == 1


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("pod.gpu=2", "unknown key pod.gpu under pod; did you mean pod.gpus?"),
        ("gpus=2", "unknown key gpus; did you mean pod.gpus?"),
        ("pretrain.training.epoch=3", "did you mean pretrain.training.epochs?"),
        ("pretrain.training.modle.arch=resnet18", "did you mean pretrain.training.model?"),
        ("restart.backofflimit=3", "did you mean restart.backoffLimit?"),
        ("lincls.training.k_crops=3", "unknown key lincls.training.k_crops"),
    ],
)
def test_unknown_keys_fail_with_a_suggestion(expression, message):
    with pytest.raises(ValuesError, match="unknown key") as error:
        load_values(sets=[expression])
    assert message in str(error.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "rendezvous:\n  joinTimeout: 10\n")
    with pytest.raises(ValuesError) as error:
        load_values([path])
    assert str(error.value).startswith(f"{path}: unknown key rendezvous.joinTimeout")
    assert "did you mean rendezvous.joinTimeoutSeconds?" in str(error.value)


def test_trainer_keys_beyond_the_defaults_are_accepted():
    # Every PretrainConfig key is known, not only those values.yaml lists.
    values = load_values(sets=["pretrain.training.queue_size=1024,pretrain.training.tau=0.1"])
    assert values["pretrain"]["training"]["queue_size"] == 1024


def test_chart_owned_trainer_keys_are_refused():
    with pytest.raises(ValuesError, match="set metrics.port instead"):
        load_values(sets=["pretrain.training.metrics.port=1"])


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("pod.gpus=many", "pod.gpus must be an integer, got string 'many'"),
        ("pretrain.training.epochs=abc", "pretrain.training.epochs must be an integer"),
        ("serviceAccount.create=yes", "serviceAccount.create must be a boolean"),
        ("pod.tolerations=x", "pod.tolerations must be a list"),
    ],
)
def test_wrong_types_fail(expression, message):
    with pytest.raises(ValuesError) as error:
        load_values(sets=[expression])
    assert message in str(error.value)


def test_wrong_type_in_file_says_to_quote(tmp_path):
    path = write(tmp_path, "image:\n  tag: 1.2\n")
    with pytest.raises(ValuesError, match="image.tag must be a string, got float 1.2 .quote it"):
        load_values([path])


def test_parse_set_syntax():
    assert parse_set(r"a.b=1,c[0].d=x\,y,e={p,q}") == [
        (["a", "b"], "1"), (["c", 0, "d"], "x,y"), (["e"], ["p", "q"]),
    ]
    assert parse_path(r"a\.b[2].c") == ["a.b", 2, "c"]
    assert format_path(["a.b", 2, "c"]) == r"a\.b[2].c"
    for bad in ("novalue", "=1", "a[x]=1", "a..b=1"):
        with pytest.raises(ValuesError):
            parse_set(bad)


def test_helm_inference():
    assert [infer(t) for t in ("true", "false", "null", "7", "-3", "1.5", "1e3", "07", "x")] == [
        True, False, None, 7, -3, 1.5, 1000.0, "07", "x",
    ]


def test_list_index_past_the_end_fails():
    with pytest.raises(ValuesError, match="past the end"):
        load_values(sets=["pod.tolerations[3].key=x"])
