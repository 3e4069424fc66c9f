"""Jobs of the REST service: records in Redis, the queue, Ray launching, the job process."""
