"""S3 calls through boto3, as a user's program would make them.

Usage: s3_calls.py MODE ENDPOINT BUCKET [N]
  profile    N list_objects_v2 calls in one boto3 Session of profile "kb" (credential_process)
  container  N calls with credentials from the container endpoint (AWS_CONTAINER_* variables)
  two-phase  one call, then wait for a line on stdin, then the same call with the same session
Prints one JSON line: {"ok": true, "calls": N} or {"error_code": ..., "error": "..."}.
"""
import json
import sys

import boto3
import botocore.exceptions


def main():
    mode, endpoint, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    try:
        # Credentials are resolved here, when the client is made.
        session = boto3.Session(profile_name="kb") if mode in ("profile", "two-phase") else boto3.Session()
        s3 = session.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        for _ in range(n):
            s3.list_objects_v2(Bucket=bucket)
        if mode == "two-phase":
            print(json.dumps({"phase": 1, "ok": True}), flush=True)
            sys.stdin.readline()
            s3.list_objects_v2(Bucket=bucket)
        print(json.dumps({"ok": True, "calls": n}), flush=True)
    except botocore.exceptions.ClientError as e:
        print(json.dumps({"error_code": e.response["Error"]["Code"], "error": str(e)}), flush=True)
    except Exception as e:
        print(json.dumps({"error_code": type(e).__name__, "error": str(e)}), flush=True)


if __name__ == "__main__":
    main()
