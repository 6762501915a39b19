"""facecompat.pipelines: the quickstart, evaluation and its report."""
