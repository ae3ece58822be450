"""Policies and manifests (supervisor/_config.py): resolution, narrowing, and errors that name file and key."""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path

import pytest

from supervisor._config import (
    BUILTIN_POLICIES,
    MAX_MANIFEST_BYTES,
    AgentConfig,
    RestartSpec,
    load_any,
    load_manifest,
    load_policy,
    policy_dirs,
)
from supervisor._errors import ConfigError
from theater.capabilities import CAPABILITIES, Capability
from theater.spec import LIMIT_BOUNDS, Limits

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = tomllib.loads((ROOT / "policies" / "default.toml").read_text())
DEFAULT_LIMITS: dict[str, int] = DEFAULT["limits"]
COMPONENT_TEXT = "(component)\n"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home directory with no site policies (yet)."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    """A directory holding a tiny component file next to where manifests are written."""
    d = tmp_path / "agent"
    d.mkdir()
    (d / "agent.wat").write_text(COMPONENT_TEXT)
    return d


def write(directory: Path, text: str, name: str = "agent.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def manifest(agent_dir: Path, extra: str = "", *, head: str = 'name = "agent"\ncomponent = "agent.wat"\n') -> Path:
    """A manifest whose top-level keys come first, then ``extra`` (which may open tables)."""
    return write(agent_dir, head + extra)


def load(path: Path, home: Path | None = None) -> AgentConfig:
    return load_manifest(path, policy_dirs(home))


def config_error(path: Path, home: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, home)
    return str(info.value)


# --- valid manifests ------------------------------------------------------------------


def test_valid_manifest_resolves_against_default_policy(agent_dir: Path, home: Path) -> None:
    """A minimal manifest gets the default policy's limits, runtime capability, default restart and the component's digest."""
    config = load(manifest(agent_dir), home)
    assert config.name == "agent"
    assert config.policy == "default"
    assert config.capabilities == ("runtime",)
    assert config.limits == Limits(**DEFAULT_LIMITS)
    assert config.restart == RestartSpec()
    assert config.init_args == b""
    assert config.component_path == str((agent_dir / "agent.wat").resolve())
    assert config.component_sha256 == hashlib.sha256(COMPONENT_TEXT.encode()).hexdigest()
    assert AgentConfig.from_dict(config.as_dict()) == config


def test_component_path_is_relative_to_the_manifest(agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative component path is resolved against the manifest's directory, not the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(manifest(agent_dir))
    assert Path(config.component_path) == (agent_dir / "agent.wat").resolve()


def test_narrowing_lowers_only_the_named_limits(agent_dir: Path) -> None:
    """Limits a manifest lowers take its values; every other limit keeps the policy's ceiling."""
    path = manifest(agent_dir, 'init_args = "5"\n[limits]\nmemory_bytes = 1048576\nwall_time_ms = 100\n'
                               '[restart]\ntype = "transient"\nintensity = 0\nperiod_ms = 1\n')
    config = load(path)
    assert config.limits.memory_bytes == 1048576
    assert config.limits.wall_time_ms == 100
    others = {k: v for k, v in config.limits.as_dict().items() if k not in ("memory_bytes", "wall_time_ms")}
    assert others == {k: v for k, v in DEFAULT_LIMITS.items() if k not in ("memory_bytes", "wall_time_ms")}
    assert config.restart == RestartSpec(type="transient", intensity=0, period_ms=1)
    assert config.init_args == b"5"


def test_limit_equal_to_the_ceiling_is_allowed(agent_dir: Path) -> None:
    """Setting a limit to exactly the policy's ceiling is narrowing by zero, not widening."""
    path = manifest(agent_dir, f"[limits]\nmemory_bytes = {DEFAULT_LIMITS['memory_bytes']}\n")
    assert load(path).limits.memory_bytes == DEFAULT_LIMITS["memory_bytes"]


def test_strict_policy_is_narrower_than_default() -> None:
    """Both built-in policies load, and strict is at most default in every limit."""
    dirs = policy_dirs(None)
    default, strict = load_policy("default", dirs), load_policy("strict", dirs)
    assert default.limits == Limits(**DEFAULT_LIMITS)
    for key in LIMIT_BOUNDS:
        assert getattr(strict.limits, key) <= getattr(default.limits, key), key
    assert default.capabilities == strict.capabilities == ("runtime",)


def test_manifest_may_name_another_policy(agent_dir: Path) -> None:
    """policy = "strict" resolves against strict's limits."""
    config = load(manifest(agent_dir, 'policy = "strict"\n'))
    assert config.policy == "strict"
    assert config.limits == load_policy("strict", policy_dirs(None)).limits


# --- widening and ranges ----------------------------------------------------------------


def test_widening_a_limit_names_file_key_and_ceiling(agent_dir: Path) -> None:
    """A limit above the policy's ceiling is an error naming the manifest, limits.memory_bytes and the ceiling."""
    path = manifest(agent_dir, "[limits]\nmemory_bytes = 134217728\n")
    message = config_error(path)
    assert str(path.resolve()) in message
    assert "limits.memory_bytes" in message
    assert "134217728" in message
    assert f"ceiling {DEFAULT_LIMITS['memory_bytes']}" in message


def test_widening_against_strict_names_strict_ceiling(agent_dir: Path) -> None:
    """Under the strict policy the ceiling named is strict's, even for a value the default would allow."""
    path = manifest(agent_dir, 'policy = "strict"\n[limits]\nwall_time_ms = 1000\n')
    message = config_error(path)
    assert "limits.wall_time_ms" in message and "ceiling 500" in message


@pytest.mark.parametrize(("extra", "fragments"), [
    ("[limits]\nmemory_bytes = 1\n", ["limits.memory_bytes", "1 is out of range 65536..4294967296"]),
    ("[limits]\nmax_log_bytes = 0\n", ["limits.max_log_bytes", "0 is out of range 1..65536"]),
    ("[limits]\nmailbox = -5\n", ["limits.mailbox", "-5 is out of range"]),
    ("[restart]\nintensity = 1001\n", ["restart.intensity", "1001 is out of range 0..1000"]),
    ("[restart]\nperiod_ms = 0\n", ["restart.period_ms", "0 is out of range 1..86400000"]),
    ('[restart]\ntype = "sometimes"\n', ["restart.type", "'sometimes' is not one of permanent, transient, temporary"]),
])
def test_out_of_range_values_are_named(agent_dir: Path, extra: str, fragments: list[str]) -> None:
    """A value outside its absolute range is an error naming the key and the range."""
    message = config_error(manifest(agent_dir, extra))
    for fragment in fragments:
        assert fragment in message


# --- unknown keys and wrong types --------------------------------------------------------------


@pytest.mark.parametrize(("extra", "fragment"), [
    ("colour = 1\n", "unknown key colour"),
    ('description = "policies only"\n', "unknown key description"),
    ("[limits]\nmemory = 1\n", "unknown key limits.memory"),
    ("[restart]\nbackoff_ms = 10\n", "unknown key restart.backoff_ms"),
    ("[extras]\na = 1\n", "unknown key extras"),
])
def test_unknown_keys_are_named(agent_dir: Path, extra: str, fragment: str) -> None:
    """An unknown key at the top level, in [limits] or in [restart] is an error naming the key."""
    path = manifest(agent_dir, extra)
    message = config_error(path)
    assert fragment in message
    assert str(path.resolve()) in message


def test_several_unknown_keys_are_all_listed(agent_dir: Path) -> None:
    """With several unknown keys the first is named and the others are listed too."""
    message = config_error(manifest(agent_dir, "zeta = 1\nalpha = 2\n"))
    assert "unknown key alpha (also: zeta)" in message


@pytest.mark.parametrize(("text", "fragment"), [
    ('name = "agent"\ncomponent = "agent.wat"\n[limits]\nmemory_bytes = "big"\n',
     "limits.memory_bytes: must be an int, got str 'big'"),
    ('name = "agent"\ncomponent = "agent.wat"\n[limits]\nfuel_per_call = true\n',
     "limits.fuel_per_call: must be an int, got bool True"),
    ('name = "agent"\ncomponent = "agent.wat"\n[limits]\nwall_time_ms = 1.5\n',
     "limits.wall_time_ms: must be an int, got float 1.5"),
    ('name = "agent"\ncomponent = "agent.wat"\n[restart]\nintensity = false\n',
     "restart.intensity: must be an int, got bool False"),
    ('name = 5\ncomponent = "agent.wat"\n', "name: must be a str, got int 5"),
    ('name = "agent"\ncomponent = ["agent.wat"]\n', "component: must be a str, got list"),
    ('name = "agent"\ncomponent = "agent.wat"\ncapabilities = "runtime"\n', "capabilities: must be a list, got str"),
    ('name = "agent"\ncomponent = "agent.wat"\nlimits = 5\n', "limits: must be a dict, got int 5"),
    ('name = "agent"\ncomponent = "agent.wat"\npolicy = 1\n', "policy: must be a str, got int 1"),
    ('name = "agent"\ncomponent = "agent.wat"\ninit_args = 7\n', "init_args: must be a str, got int 7"),
])
def test_wrong_types_are_named(agent_dir: Path, text: str, fragment: str) -> None:
    """A value of the wrong TOML type (string or bool for an int, int for a string...) names key and type."""
    assert fragment in config_error(write(agent_dir, text))


@pytest.mark.parametrize("name", ["Agent", "-agent", "a b", "a" * 64, "", "agent/x", "../agent"])
def test_bad_agent_names_are_refused(agent_dir: Path, name: str) -> None:
    """A name outside 1-63 characters of a-z, 0-9, '-', '_' (starting alphanumeric) is refused, naming the key."""
    message = config_error(manifest(agent_dir, head=f'name = "{name}"\ncomponent = "agent.wat"\n'))
    assert "name:" in message and "must be 1-63 characters" in message


def test_agent_name_with_trailing_newline_is_refused(agent_dir: Path) -> None:
    """A name ending in a newline is not 1-63 characters of a-z, 0-9, '-', '_' and is refused."""
    message = config_error(manifest(agent_dir, head='name = "agent\\n"\ncomponent = "agent.wat"\n'))
    assert "must be 1-63 characters" in message


def test_policy_name_with_trailing_newline_is_not_a_plain_name(home: Path) -> None:
    """A policy name ending in a newline is refused as not a plain name, before any lookup."""
    with pytest.raises(ConfigError, match="is not a plain name"):
        load_policy("default\n", policy_dirs(home))


def test_init_args_beyond_latin1_are_refused(agent_dir: Path) -> None:
    """init_args are bytes written as U+0000..U+00FF; a character above that is refused, naming the key."""
    assert "init_args: must be bytes" in config_error(manifest(agent_dir, 'init_args = "✓"\n'))


# --- missing pieces, components, TOML ---------------------------------------------------------------


def test_missing_name_is_named(agent_dir: Path) -> None:
    """A manifest without name says the required key name is missing."""
    message = config_error(manifest(agent_dir, head='component = "agent.wat"\n'))
    assert "missing required key name" in message


def test_missing_component_is_named(agent_dir: Path) -> None:
    """A manifest without component says the required key component is missing."""
    message = config_error(manifest(agent_dir, head='name = "agent"\n'))
    assert "missing required key component" in message


@pytest.mark.parametrize("component", ["agent.txt", "agent", "agent.wasm.bak"])
def test_component_must_be_wasm_or_wat(agent_dir: Path, component: str) -> None:
    """A component that is not a .wasm or .wat file is refused, naming the key."""
    (agent_dir / component).write_text(COMPONENT_TEXT)
    message = config_error(manifest(agent_dir, head=f'name = "agent"\ncomponent = "{component}"\n'))
    assert "component:" in message and "must name a .wasm or .wat file" in message


def test_missing_component_file_is_refused(agent_dir: Path) -> None:
    """A component path that does not exist is refused, naming the key and the resolved path."""
    message = config_error(manifest(agent_dir, head='name = "agent"\ncomponent = "missing.wasm"\n'))
    assert "component:" in message and "does not exist" in message
    assert str((agent_dir / "missing.wasm").resolve()) in message


def test_component_that_is_a_directory_is_refused(agent_dir: Path) -> None:
    """A component path naming a directory is refused as not a regular file."""
    (agent_dir / "dir.wasm").mkdir()
    message = config_error(manifest(agent_dir, head='name = "agent"\ncomponent = "dir.wasm"\n'))
    assert "is a directory, not a regular file" in message


def test_invalid_toml_is_refused(agent_dir: Path) -> None:
    """A manifest that does not parse as TOML is an error naming the file and saying it is not valid TOML."""
    path = write(agent_dir, 'name = "agent"\ncomponent = \n')
    message = config_error(path)
    assert "not valid TOML" in message and str(path.resolve()) in message


def test_missing_manifest_file_is_refused(agent_dir: Path) -> None:
    """A manifest path that does not exist is a ConfigError, not an OSError."""
    assert "no such file" in config_error(agent_dir / "nope.toml")


# --- policies ------------------------------------------------------------------------------------------


def test_a_policy_is_parsed_again_exactly_when_its_bytes_change(home: Path) -> None:
    """Every spawn reads its policy file; the parse is kept and reused only while the file's bytes are the same."""
    (home / "policies").mkdir()
    path = home / "policies" / "lab.toml"
    text = (ROOT / "policies" / "default.toml").read_text()
    path.write_text(text)
    first = load_policy("lab", policy_dirs(home))
    assert load_policy("lab", policy_dirs(home)) is first
    path.write_text(text.replace(f"mailbox = {DEFAULT_LIMITS['mailbox']}", "mailbox = 7"))
    changed = load_policy("lab", policy_dirs(home))
    assert changed.limits.mailbox == 7 and first.limits.mailbox == DEFAULT_LIMITS["mailbox"]
    path.write_text(text.replace("[limits]", "[limits]\nsurprise = 1"))
    with pytest.raises(ConfigError, match="surprise"):
        load_policy("lab", policy_dirs(home))
    path.write_text(text)
    assert load_policy("lab", policy_dirs(home)) is first


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "sub/default", "/tmp/default", "Default", ".hidden", ""])
def test_policy_name_with_a_path_is_refused(agent_dir: Path, home: Path, name: str) -> None:
    """A policy name that is not a plain name (a path, upper case, empty) is refused before any file is opened."""
    with pytest.raises(ConfigError, match="is not a plain name"):
        load_policy(name, policy_dirs(home))
    message = config_error(manifest(agent_dir, f'policy = "{name}"\n'), home)
    assert "is not a plain name" in message and repr(name) in message


def test_traversal_policy_name_is_refused_even_if_the_file_exists(tmp_path: Path, home: Path) -> None:
    """A ../x policy name is refused even when <home>/policies/../x.toml is a valid policy file."""
    (home / "policies").mkdir()
    (home / "x.toml").write_text((ROOT / "policies" / "default.toml").read_text())
    with pytest.raises(ConfigError, match="is not a plain name"):
        load_policy("../x", policy_dirs(home))


def test_unknown_policy_is_refused(agent_dir: Path, home: Path) -> None:
    """A policy name found in no policy directory is refused, naming it and the directories searched."""
    message = config_error(manifest(agent_dir, 'policy = "nope"\n'), home)
    assert "no policy named 'nope'" in message
    assert str(home / "policies") in message and str(BUILTIN_POLICIES) in message


def test_unknown_capability_is_refused(agent_dir: Path) -> None:
    """A capability that does not exist is refused, naming the key, the capability and the known ones."""
    message = config_error(manifest(agent_dir, 'capabilities = ["runtime", "network"]\n'))
    assert "capabilities: unknown capability 'network'" in message and "known: runtime" in message


def test_non_string_capability_is_refused(agent_dir: Path) -> None:
    """A capability list holding a non-string is refused as an unknown capability."""
    assert "unknown capability 3" in config_error(manifest(agent_dir, "capabilities = [3]\n"))


def test_capability_not_granted_by_the_policy_is_refused(agent_dir: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A known capability the policy does not grant is refused; a site policy granting it lets it through."""
    monkeypatch.setitem(CAPABILITIES, "clock", Capability("clock", "theater:agent/clock@0.1.0"))
    path = manifest(agent_dir, 'capabilities = ["clock"]\n')
    message = config_error(path, home)
    assert "capabilities: 'clock' is not granted by the policy" in message
    (home / "policies").mkdir()
    granting = (ROOT / "policies" / "default.toml").read_text().replace(
        'capabilities = ["runtime"]', 'capabilities = ["runtime", "clock"]')
    (home / "policies" / "clocked.toml").write_text(granting)
    config = load(manifest(agent_dir, 'policy = "clocked"\ncapabilities = ["clock"]\n'), home)
    assert config.capabilities == ("runtime", "clock")


def test_runtime_capability_is_always_granted(agent_dir: Path) -> None:
    """An empty capability list still yields the runtime capability, and duplicates collapse."""
    assert load(manifest(agent_dir, "capabilities = []\n")).capabilities == ("runtime",)
    assert load(manifest(agent_dir, 'capabilities = ["runtime", "runtime"]\n')).capabilities == ("runtime",)


def test_site_policy_is_found_before_the_builtin(agent_dir: Path, home: Path) -> None:
    """<home>/policies/default.toml shadows the built-in default, for load_policy and for manifests."""
    (home / "policies").mkdir()
    site = (ROOT / "policies" / "default.toml").read_text().replace("memory_bytes = 67108864", "memory_bytes = 2097152")
    assert site != (ROOT / "policies" / "default.toml").read_text()
    (home / "policies" / "default.toml").write_text(site)
    assert policy_dirs(home) == [home / "policies", BUILTIN_POLICIES]
    assert load_policy("default", policy_dirs(home)).limits.memory_bytes == 2097152
    assert load(manifest(agent_dir), home).limits.memory_bytes == 2097152
    message = config_error(manifest(agent_dir, "[limits]\nmemory_bytes = 4194304\n"), home)
    assert "ceiling 2097152" in message
    # Without the home, the built-in policy applies again.
    assert load(manifest(agent_dir)).limits.memory_bytes == DEFAULT_LIMITS["memory_bytes"]


def test_site_policy_missing_a_limit_is_refused(home: Path) -> None:
    """A policy must set every limit; the error names the policy file and the missing limits."""
    (home / "policies").mkdir()
    text = (ROOT / "policies" / "default.toml").read_text().replace("mailbox = 1000", "")
    path = home / "policies" / "partial.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy("partial", policy_dirs(home))
    assert str(path) in str(info.value) and "missing mailbox" in str(info.value)


@pytest.mark.parametrize(("change", "fragment"), [
    (("mailbox = 1000", "mailbox = 1000\nextra = 1"), "unknown key limits.extra"),
    (("mailbox = 1000", "mailbox = 0"), "limits.mailbox: 0 is out of range"),
    (("mailbox = 1000", 'mailbox = "many"'), "limits.mailbox: must be an int"),
    (("description =", "colour = 1\ndescription ="), "unknown key colour"),
    (('capabilities = ["runtime"]', 'capabilities = ["runtime", "network"]'), "unknown capability 'network'"),
    (("[limits]", "[limits"), "not valid TOML"),
])
def test_invalid_site_policy_is_refused(home: Path, change: tuple[str, str], fragment: str) -> None:
    """A site policy with an unknown key, a bad value or bad TOML is refused with the file and key named."""
    (home / "policies").mkdir()
    text = (ROOT / "policies" / "default.toml").read_text()
    assert change[0] in text
    path = home / "policies" / "site.toml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as info:
        load_policy("site", policy_dirs(home))
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_init_args_longer_than_the_message_limit_are_refused(agent_dir: Path) -> None:
    """init_args must fit max_message_bytes, else init could never run and the agent would crash-loop."""
    message = config_error(manifest(agent_dir, 'init_args = "abcd"\n[limits]\nmax_message_bytes = 3\n'))
    assert "init_args" in message and "max_message_bytes 3" in message


# --- files that are not what they claim, and errors that must stay readable ------------------


def test_manifests_policies_includes_and_components_must_be_regular_files(agent_dir: Path, home: Path) -> None:
    """A FIFO (which would block an open), /dev/zero and a symlink to it (which would be read without end),
    a directory and an oversized file are refused at once, naming the file and what it is."""
    fifo = agent_dir / "fifo.toml"
    os.mkfifo(fifo)
    assert "is a FIFO, not a regular file" in config_error(fifo)
    zero = agent_dir / "zero.toml"
    zero.symlink_to("/dev/zero")
    assert "is a character device, not a regular file" in config_error(zero)
    assert "is a character device, not a regular file" in config_error(Path("/dev/zero"))
    (agent_dir / "dir.toml").mkdir()
    assert "is a directory, not a regular file" in config_error(agent_dir / "dir.toml")
    big = write(agent_dir, "# " + "x" * MAX_MANIFEST_BYTES + "\n", "big.toml")
    assert f"more than {MAX_MANIFEST_BYTES}" in config_error(big)
    # a policy that is a FIFO, an include that is /dev/zero, a component that is a FIFO
    (home / "policies").mkdir()
    os.mkfifo(home / "policies" / "piped.toml")
    assert "is a FIFO, not a regular file" in config_error(manifest(agent_dir, 'policy = "piped"\n'), home)
    tree = write(agent_dir, 'name = "t"\n[[children]]\nmanifest = "zero.toml"\n', "tree.toml")
    with pytest.raises(ConfigError, match="character device, not a regular file"):
        load_any(tree, policy_dirs(None))
    os.mkfifo(agent_dir / "piped.wasm")
    assert "is a FIFO, not a regular file" in config_error(manifest(agent_dir, head='name = "a"\ncomponent = "piped.wasm"\n'))


def test_a_toml_nested_too_deeply_is_a_config_error(agent_dir: Path) -> None:
    deep = write(agent_dir, "x = " + "[" * 200_000 + "]" * 200_000 + "\n", "deep.toml")
    assert "nested too deeply" in config_error(deep)


def test_tens_of_thousands_of_unknown_keys_give_a_short_error(agent_dir: Path) -> None:
    """As many unknown keys as fit the size cap: the error names the first few and counts the rest."""
    keys = "".join(f"k{i} = 1\n" for i in range(80_000))
    message = config_error(manifest(agent_dir, keys))
    assert message.count(", ") == 9 and "and 79989 more" in message
    assert len(message) < 2000
