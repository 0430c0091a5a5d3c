"""moto S3+IAM server with signature checks on, plus an IAM mirror for the fake cloud.

Usage: moto_mirror.py PORT

Starts moto on 127.0.0.1:PORT with INITIAL_NO_AUTH_ACTION_COUNT=3, spends those three
unauthenticated calls making an admin user, then answers one JSON request per stdin line:
  {"op": "create", "user": U}        -> {"id": ..., "secret": ...}  (IAM user U, allow-all policy, one key)
  {"op": "delete", "user": U, "id": K} -> {"ok": true}              (the key stops working at once)
Errors are answered as {"error": "..."}. Exits when stdin closes, taking moto with it.
"""
import json
import os
import sys

os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def main():
    port = int(sys.argv[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"

    def iam(key_id, secret):
        return boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    boot = iam("bootstrap", "bootstrap")
    boot.create_user(UserName="mirror-admin")
    boot.put_user_policy(UserName="mirror-admin", PolicyName="all", PolicyDocument=ALLOW_ALL)
    admin_key = boot.create_access_key(UserName="mirror-admin")["AccessKey"]
    admin = iam(admin_key["AccessKeyId"], admin_key["SecretAccessKey"])
    print(json.dumps({"ready": True, "endpoint": endpoint}), flush=True)

    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["op"] == "create":
                admin.create_user(UserName=req["user"])
                admin.put_user_policy(UserName=req["user"], PolicyName="all", PolicyDocument=ALLOW_ALL)
                key = admin.create_access_key(UserName=req["user"])["AccessKey"]
                out = {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
            elif req["op"] == "delete":
                admin.delete_access_key(UserName=req["user"], AccessKeyId=req["id"])
                out = {"ok": True}
            else:
                out = {"error": f"unknown op {req['op']!r}"}
        except Exception as e:  # report every failure to the test, keep serving
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
