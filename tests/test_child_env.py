"""Commands lobbyd runs (CALLBACK, exec checks) do not inherit its secrets: TOKEN,
REDIS_PASSWORD, NATS credentials (NATS_URL keeps its host, loses user:password@) and
every NATS_*/REDIS_* variable named like a secret. A check's output is shown in
/v1/health, so a check printing its environment must not publish them there."""

from __future__ import annotations

import json
import sys

from conftest import NatsServer, wait_for

import lobbyd as L

TOKEN = "tok-child-env-1"
NATS_PASS = "natspass-child-2"
REDIS_PASS = "redispass-child-3"
OTHERS = {"NATS_CREDS": "/secret/creds-4", "NATS_NKEY": "nkey-child-5",
          "NATS_TOKEN": "natstoken-child-6", "REDIS_AUTH_SECRET": "redissecret-child-7"}
SECRETS = [TOKEN, NATS_PASS, REDIS_PASS, *OTHERS.values()]


def test_child_environment_is_pure() -> None:
    env = L.child_environment({"PATH": "/bin", "TOKEN": "t", "REDIS_PASSWORD": "r",
                               "NATS_URL": "nats://u:p@a:4222, tls://tok@b:4222,c:4222",
                               "NATS_CREDS": "x", "NATS_USER_JWT": "j", "NATS_NKEY_SEED": "s",
                               "NATS_DISCOVERY_CHANNEL": "lobby.discovery", "MY_TOKEN": "m"})
    assert env == {"PATH": "/bin", "NATS_URL": "nats://a:4222,tls://b:4222,c:4222",
                   "NATS_DISCOVERY_CHANNEL": "lobby.discovery", "MY_TOKEN": "m"}


def test_callback_and_checks_do_not_see_the_secrets(lobbyd, tmp_path) -> None:
    nats = NatsServer(tmp_path, extra=["--user", "lobby", "--pass", NATS_PASS],
                      client_auth={"user": "lobby", "pass": NATS_PASS}).start()
    try:
        dump = tmp_path / "callback-env.json"
        script = tmp_path / "dump_env.py"
        script.write_text(f"import json, os\nopen({str(dump)!r} + '.new', 'w').write("
                          "json.dumps(dict(os.environ)))\n"
                          f"os.replace({str(dump)!r} + '.new', {str(dump)!r})\n")  # whole
        checks = tmp_path / "checks"
        checks.mkdir()
        # what the check prints is its output in /v1/health
        (checks / "env.check").write_text(
            "labels=check:env\ninterval=0.2\n"
            "exec=sh -c 'echo \"T=$TOKEN R=$REDIS_PASSWORD N=$NATS_URL C=$NATS_CREDS "
            "K=$NATS_NKEY O=$NATS_TOKEN S=$REDIS_AUTH_SECRET P=$PATH\"'\n")
        d = lobbyd("child.env", nats=nats, start=False, TOKEN=TOKEN, REDIS_PASSWORD=REDIS_PASS,
                   NATS_URL=f"nats://lobby:{NATS_PASS}@127.0.0.1:{nats.port}",
                   CHECKS_PATH=str(checks), CALLBACK=f"{sys.executable} {script}",
                   CALLBACK_FIRST_RUN_DELAY="0", **OTHERS)
        d.start(wait=False)
        auth = {"Authorization": f"Token {TOKEN}"}

        def check_output() -> str:
            status, _, body = d.request("GET", "/v1/health", headers=auth)
            return json.loads(body).get("checks", {}).get("env", {}).get("output", "") \
                if status == 200 else ""

        output = wait_for(check_output, timeout=15, what="the check's output in /v1/health")
        wait_for(dump.exists, timeout=15, what="the callback's environment dump")
        env = json.loads(dump.read_text())
        shown = [(name, output if name == "check" else json.dumps(env))
                 for name in ("check", "callback")]
        for name, text in shown:
            for secret in SECRETS:
                assert secret not in text, f"{name} saw {secret!r}: {text[:400]}"
        assert f"N=nats://127.0.0.1:{nats.port} " in output, output
        assert env["NATS_URL"] == f"nats://127.0.0.1:{nats.port}"
        assert "TOKEN" not in env and "REDIS_PASSWORD" not in env and "PATH" in env
        assert "HOSTNAME" in env  # the rest of the environment is passed on
    finally:
        nats.stop()
