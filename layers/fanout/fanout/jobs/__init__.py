"""Jobs: a batch too large for one invocation, run in chunks by worker functions on SQS.

- `messages`: what goes through the chunk queue (small: a chunk is a byte range of S3);
- `files`: the S3 keys and what is read and written there;
- `store`: the job table (DynamoDB): jobs, chunk leases and results, target pauses;
- `split`: an input file into chunk messages, in a worker, after the submit's answer;
- `chunk`: one chunk through POST /batch's runner, its results written once;
- `worker`: the SQS handler (Powertools' batch processor, partial failures);
- `api`: POST /jobs, /jobs/uploads, GET and DELETE /jobs/{id}, the results' pages.

Every AWS call is plain boto3, so the same code runs against moto locally and AWS
deployed: only AWS_ENDPOINT_URL differs.
"""
