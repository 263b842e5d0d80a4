"""Reading the configuration: a per-file cache (a reload reads only the
files that changed), config.load of a path, text or objects, the fast YAML
construction and the JSON path (each the same objects as the strict
loader), and the inotify watcher."""
import json
import os
import threading
import time

import pytest
import yaml

from engine import config
from engine.config import ConfigError

SVC = "kind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.{n}, ports: [{{port: 80}}]}}\n"


def tree(tmp_path, files=3):
    m = tmp_path / "manifests"
    m.mkdir()
    for i in range(files):
        (m / f"f{i}.yaml").write_text(SVC.format(name=f"s{i}", n=i + 20))
    p = tmp_path / "engine.yaml"
    p.write_text("kind: EngineConfiguration\nmanifests: [./manifests]\n")
    return p, m


def test_a_reload_reads_only_the_files_that_changed(tmp_path):
    p, m = tree(tmp_path)
    cache = config.FileCache()
    cfg = config.load(str(p), cache=cache)
    assert len(cache.read) == 4 and len(cfg.services) == 3
    cfg2 = config.load(str(p), cache=cache)
    assert cache.read == []
    assert cfg2.services[0] is cfg.services[0]          # the parsed objects themselves are reused
    (m / "f1.yaml").write_text(SVC.format(name="s1", n=99))
    cfg3 = config.load(str(p), cache=cache)
    assert cache.read == [str(m / "f1.yaml")]
    assert {s.cluster_ip for s in cfg3.services} == {"10.96.0.20", "10.96.0.99", "10.96.0.22"}
    (m / "f2.yaml").unlink()                            # a file gone is a file forgotten
    cfg4 = config.load(str(p), cache=cache)
    assert len(cfg4.services) == 2 and str(m / "f2.yaml") not in cache.entries


def test_a_broken_file_is_read_again_once_fixed(tmp_path):
    p, m = tree(tmp_path)
    cache = config.FileCache()
    config.load(str(p), cache=cache)
    (m / "f0.yaml").write_text("kind: Service\nmetadata: {name: s0\n")
    with pytest.raises(ConfigError, match="f0.yaml"):
        config.load(str(p), cache=cache)
    (m / "f0.yaml").write_text(SVC.format(name="s0", n=20))
    assert len(config.load(str(p), cache=cache).services) == 3


def test_load_takes_text_or_objects_as_well_as_a_path(tmp_path):
    text = "kind: EngineConfiguration\nscheduler: mh\n---\n" + SVC.format(name="a", n=5)
    by_text = config.load(text=text)
    by_objects = config.load(objects=list(yaml.safe_load_all(text)))
    p = tmp_path / "c.yaml"
    p.write_text(text)
    by_path = config.load(str(p))
    for c in (by_text, by_objects):
        assert c.engine == by_path.engine and c.services == by_path.services
    assert by_text.engine.scheduler == "mh"
    with pytest.raises(TypeError):
        config.load(str(p), text=text)
    with pytest.raises(ConfigError, match="<text>"):
        config.load(text="kind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 0}]}\n")


STRICT_CASES = [
    "a: 1\nb: [x, 2, null, ~, true, no, 0755, 0x1f, 1.5, -3, '07', 2024-01-01T00:00:00Z]\n",
    "base: &b {x: 1, y: [1, 2]}\nc: *b\nd: {<<: *b, z: 3}\n",
    "- {a: 1}\n- [1, [2, [3]]]\n- !!str 12\n- !!binary aGVsbG8=\n",
    "k: |\n  multi\n  line\nf: >\n  folded\n  text\n",
    "1: int key\n'2': str key\n",
]


@pytest.mark.parametrize("text", STRICT_CASES)
def test_fast_yaml_gives_what_the_strict_loader_gives(text):
    assert config._yaml_docs(text, "x") == list(yaml.load_all(text, Loader=config.StrictSafeLoader))


def test_fast_yaml_refuses_duplicate_keys_and_survives_an_alias_bomb():
    with pytest.raises(ConfigError, match="line 2.*duplicate key 'a'"):
        config._yaml_docs("a: 1\na: 2\n", "x")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    t0 = time.perf_counter()
    doc = config._yaml_docs(bomb, "x")[0]
    assert time.perf_counter() - t0 < 2 and doc["i"][0] is doc["i"][1]       # built once, shared


def test_json_is_read_by_json_and_gives_the_same_objects(tmp_path):
    docs = [{"kind": "List", "items": [yaml.safe_load(SVC.format(name=f"s{i}", n=i + 2)) for i in range(3)]}]
    text = json.dumps(docs[0])
    assert config._yaml_docs(text, "x") == docs
    with pytest.raises(ConfigError, match="duplicate key"):
        config._yaml_docs('{"kind": "Service", "kind": "Pod"}', "x")
    # YAML that merely starts like JSON is still YAML
    assert config._yaml_docs("{a: 1}\n", "x") == [{"a": 1}]
    p = tmp_path / "c.json"
    p.write_text(text)
    assert [s.name for s in config.load(str(p)).services] == ["s0", "s1", "s2"]


def test_the_watcher_notices_writes_renames_and_removals(tmp_path):
    pytest.importorskip("inotify_simple")
    from engine.watch import FileWatcher
    p, m = tree(tmp_path)
    seen = []
    got = threading.Event()

    def changed(noticed, paths):
        seen.append(paths)
        got.set()

    w = FileWatcher(lambda: ([str(p)] + [str(f) for f in m.iterdir()], [str(m)]), changed).start()
    try:
        def expect(action, want=True):
            got.clear()
            t0 = time.perf_counter()
            action()
            assert got.wait(2 if want else 0.3) == want, (action, seen)
            dt = time.perf_counter() - t0
            time.sleep(0.1)         # one change at a time: the next is not folded into this one
            return dt
        assert expect(lambda: (m / "f0.yaml").write_text("x: 1\n")) < 1.0      # in place
        tmp = m / ".f1.yaml.tmp"
        expect(lambda: (tmp.write_text("y: 2\n"), os.replace(tmp, m / "f1.yaml")))   # renamed over
        expect(lambda: (m / "new.yaml").write_text("z: 3\n"))                  # a new file in a folder
        expect(lambda: (m / "f2.yaml").unlink())                               # removed
        assert seen[-4:] == [[str(m / "f0.yaml")], [str(m / "f1.yaml")], [str(m / "new.yaml")], [str(m / "f2.yaml")]]
        expect(lambda: p.write_text("kind: EngineConfiguration\n"))            # the main file
        expect(lambda: (m / "notes.txt").write_text("n"), want=False)          # not a manifest
        expect(lambda: (m / ".hidden.yaml").write_text("n"), want=False)       # an editor's temporary
    finally:
        w.close()
