"""Running clipflow on a Kubeflow cluster: TrainJobs, the cluster build of the pipeline, S3 transfers."""
