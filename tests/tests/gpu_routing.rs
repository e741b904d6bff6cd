//! GPU routing against the CPU reference: stable order, offsets, dropped slots, bad ids.

use mxmoe::Error;
use mxmoe::reference::flatten_sort_count;
use mxmoe::routing::DeviceRouting;
use mxmoe_tests::{Rng, gpu};

fn check(ids: &[i64], t: usize, k: usize, e: usize) {
    let Some(gpu) = gpu() else { return };
    let dev = DeviceRouting::from_host_ids(gpu, ids, t, k, e).unwrap();
    dev.check(gpu).unwrap();
    let got = dev.to_host(gpu).unwrap();
    let expect = flatten_sort_count(ids, t, k, e).unwrap();
    assert_eq!(
        got.expert_offsets, expect.expert_offsets,
        "offsets (T={t}, k={k}, E={e})"
    );
    assert_eq!(
        got.sorted_expert_idxs, expect.sorted_expert_idxs,
        "sorted experts"
    );
    assert_eq!(
        got.sorted_scattered_idxs, expect.sorted_scattered_idxs,
        "stable scattered order"
    );
}

#[test]
fn routing_matches_reference_on_random_and_edge_inputs() {
    let mut rng = Rng::new(5);
    for &(t, k, e) in &[
        (1usize, 1usize, 1usize),
        (1, 4, 4),
        (16, 2, 8),
        (1000, 8, 256),
        (5000, 6, 64),
        (3000, 2, 3),
    ] {
        let ids: Vec<i64> = (0..t * k).map(|_| rng.below(e as u64) as i64).collect();
        check(&ids, t, k, e);
    }
    // All on one expert, and skewed with drops.
    check(&vec![2; 3000], 1500, 2, 4);
    let ids: Vec<i64> = (0..4096)
        .map(|i| if i % 7 == 0 { -1 } else { (i % 3) as i64 })
        .collect();
    check(&ids, 1024, 4, 300);
}

#[test]
fn routing_rejects_bad_ids_with_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let invalid_id = |r: mxmoe::Result<DeviceRouting>, slot: usize, id: i64| {
        let err = r.expect_err("a bad id must be refused");
        match &err {
            Error::InvalidArgument {
                what: "expert ids",
                detail,
            } => assert!(
                detail.contains(&format!("slot {slot} has expert id {id}")),
                "{err}"
            ),
            _ => panic!("expected InvalidArgument for expert ids, got {err:?}"),
        }
    };
    invalid_id(DeviceRouting::from_host_ids(gpu, &[0, 8], 1, 2, 8), 1, 8);
    invalid_id(DeviceRouting::from_host_ids(gpu, &[0, -2], 1, 2, 8), 1, -2);
    let err = DeviceRouting::from_host_ids(gpu, &[0, 1, 2], 1, 2, 8).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                tensor: "expert ids",
                ..
            }
        ),
        "{err:?}"
    );
    let err = DeviceRouting::from_host_ids(gpu, &[0, 1], 1, 0, 8).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "top_k", .. }),
        "{err:?}"
    );
    let err = DeviceRouting::from_host_ids(gpu, &[-1, -1], 1, 2, 0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                what: "num_experts",
                ..
            }
        ),
        "{err:?}"
    );
    // Device-side ids: the kernels flag them and `check` reports it; good ids pass `check`.
    let ids = mxmoe::device::upload(gpu, &[0i32, 9, 1, 2]).unwrap();
    let r =
        DeviceRouting::from_device_ids(gpu, mxmoe::routing::DeviceIds::I32(&ids), 2, 2, 8).unwrap();
    let err = r.check(gpu).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                what: "expert ids",
                ..
            }
        ),
        "{err:?}"
    );
    let ids = mxmoe::device::upload(gpu, &[0i32, 7, -1, 2]).unwrap();
    let r =
        DeviceRouting::from_device_ids(gpu, mxmoe::routing::DeviceIds::I32(&ids), 2, 2, 8).unwrap();
    r.check(gpu).expect("ids in [-1, E) pass the device check");
}
