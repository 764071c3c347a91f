"""Test-suite settings shared by all test files."""

# The files with the longest end-to-end tests go first: with the test files spread over two
# workers (scripts/test.sh, pytest-xdist --dist loadfile) the long ones then run side by side
# instead of one of them running alone at the end.
LONGEST_FIRST = ("test_configurations.py", "test_e2e_nnunet.py", "test_demo.py", "test_brats_reproduce.py",
                 "test_gpu_augmentation.py", "test_segmamba_v2.py", "test_compile.py", "test_classification.py",
                 "test_reproduce_baselines.py", "test_triton_scan.py", "test_landmarks.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
