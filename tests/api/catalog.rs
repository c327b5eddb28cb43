//! The catalog over REST: listing, paging, lookups and their errors.

use testkit::spawn_app;

#[actix_rt::test]
async fn seeded_catalog_is_listed_page_by_page() {
    let app = spawn_app().await;
    let (status, page) = app.get_json("/products?limit=20").await;
    assert_eq!(status, 200);
    let products = page["products"].as_array().unwrap();
    assert_eq!(products.len(), 20);
    assert_eq!(products[0]["product_id"], 1);
    assert!(products[0]["price_cents"].as_i64().unwrap() > 0);
    assert!(products[0]["stock"].as_i64().unwrap() >= 0);
    assert_eq!(page["next_after"], 20);

    let mut seen = 0;
    let mut after = 0;
    loop {
        let (_, page) = app.get_json(&format!("/products?limit=20&after={after}")).await;
        let products = page["products"].as_array().unwrap();
        seen += products.len();
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, 50, "every seeded product is listed once");
    app.stop().await;
}

#[actix_rt::test]
async fn products_filter_by_ids_and_single_lookup() {
    let app = spawn_app().await;
    let (status, page) = app.get_json("/products?ids=3,7,49,999").await;
    assert_eq!(status, 200);
    let ids: Vec<i64> = page["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["product_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 7, 49]);

    let (status, product) = app.get_json("/products/7").await;
    assert_eq!(status, 200);
    assert_eq!(product["product_id"], 7);
    assert!(product["name"].as_str().unwrap().ends_with(" 7"));
    app.stop().await;
}

#[actix_rt::test]
async fn bad_requests_get_their_status_and_json_code() {
    let app = spawn_app().await;
    let cases = [
        ("/products/abc", 400, "bad_request"),
        ("/products/-3", 400, "bad_request"),
        ("/products/0", 400, "bad_request"),
        ("/products/99999999999999999999999", 400, "bad_request"),
        ("/products/12345", 404, "not_found"),
        ("/products?limit=0", 400, "bad_request"),
        ("/products?limit=abc", 400, "bad_request"),
        ("/products?after=x", 400, "bad_request"),
        ("/products?ids=1,,2", 400, "bad_request"),
        ("/products?bogus=1", 400, "bad_request"),
        ("/products/12345/photo", 404, "not_found"),
        ("/nope", 404, "not_found"),
    ];
    for (path, status, code) in cases {
        let (got, body) = app.get_json(path).await;
        assert_eq!((got, body["code"].as_str().unwrap()), (status, code), "{path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{path}: {body}"
        );
    }
    let mut res = app.client().delete(app.url("/products/1")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 405);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
    app.stop().await;
}
